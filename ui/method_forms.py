"""Method picker forms, built from the method registry (``loracompose.METHODS``).

Every method is a dataclass whose fields are its settings, read by ``loracompose.methods.settings``
(as the CLI and bench suites read them), so each field gets a control from its type: bool ->
checkbox, int/float -> number, str -> text, a field with ``choices`` (metadata or Literal) -> dropdown
(a dropdown that allows other values when the field's docstring quotes its values as ``"a"``,
``"b"``), tuples/lists -> comma-separated numbers, dicts -> ``name=value`` pairs, ``X | None`` -> a
text box where empty means "automatic". Help texts are the settings' help (field metadata, else the
class docstring). A new method registered in ``METHODS`` therefore gets its panel with no UI code.

Extension points, for methods whose settings need more than a typed field:

* ``FIELD_CONTROLS[(method name, field name)]``: a factory returning the field's
  :class:`SettingControl` (the boxes text of LoRA-Composer and regional, regional's mask canvas:
  one painted layer per LoRA, saved as mask files). The control's ``parse`` turns the component value
  into the field value.
* ``PANEL_EXTRAS[method name]``: called inside the method's group after its controls are drawn,
  with the :class:`MethodPanel`; it may add buttons and wire events (AutoLoRA's "suggest" button
  filling in the panel's controls).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tempfile
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gradio as gr
import numpy as np
from PIL import Image

from loracompose.errors import UserError
from loracompose.methods.base import CompositionMethod
from loracompose.methods.settings import Setting, method_settings, strip_optional
from loracompose.outputs import atomic_write


@dataclass
class SettingControl:
    """One method setting: the dataclass field it fills, its component, and the conversions."""

    field_name: str
    component: gr.components.Component
    parse: Callable[[Any], Any]  # component value -> field value; raises UserError
    show: Callable[[Any], Any]  # field value (as in settings()) -> component value


@dataclass
class MethodPanel:
    """One method's settings group in the page."""

    name: str
    method_class: type[CompositionMethod]
    group: gr.Group
    controls: list[SettingControl]

    def build(self, values: Sequence[Any]) -> CompositionMethod:
        """The method object from its controls' values (in ``controls`` order)."""
        settings = {control.field_name: control.parse(value) for control, value in zip(self.controls, values)}
        try:
            return self.method_class(**settings)
        except (TypeError, ValueError) as error:
            raise UserError(f"{self.name} settings: {error}") from None

    def shown_values(self, settings: Mapping[str, Any]) -> list[Any]:
        """Component values showing ``settings`` (a method's ``settings()``); missing keys keep the value."""
        return [control.show(settings[control.field_name]) if control.field_name in settings else gr.update()
                for control in self.controls]


ControlFactory = Callable[[str, dataclasses.Field, Any, Any, str], SettingControl | None]  # None: not editable
FIELD_CONTROLS: dict[tuple[str, str], ControlFactory] = {}
PANEL_EXTRAS: dict[str, Callable[[MethodPanel], None]] = {}


class MethodForms:
    """The settings groups of all registered methods; one is visible, the picked one."""

    def __init__(self, methods: Mapping[str, type[CompositionMethod]], picked: str):
        self.panels: dict[str, MethodPanel] = {}
        for name, method_class in methods.items():
            with gr.Group(visible=name == picked) as group:
                panel = MethodPanel(name, method_class, group, list(method_controls(name, method_class)))
                if not panel.controls:
                    gr.Markdown(f"*{name} has no settings.*")
                PANEL_EXTRAS.get(name, lambda _: None)(panel)
            self.panels[name] = panel

    @property
    def components(self) -> list[gr.components.Component]:
        """Every method's controls, panel after panel: the flat inputs of generate/compare events."""
        return [control.component for panel in self.panels.values() for control in panel.controls]

    @property
    def groups(self) -> list[gr.Group]:
        return [panel.group for panel in self.panels.values()]

    def method(self, name: str, flat_values: Sequence[Any]) -> CompositionMethod:
        """The named method with the settings its panel shows (``flat_values`` as in ``components``)."""
        if name not in self.panels:
            raise UserError(f"method {name!r} is not available; choose one of {', '.join(self.panels)}")
        start = 0
        for panel_name, panel in self.panels.items():
            if panel_name == name:
                return panel.build(flat_values[start:start + len(panel.controls)])
            start += len(panel.controls)
        raise AssertionError("unreachable")

    def visibility(self, name: str) -> list[Any]:
        return [gr.update(visible=panel_name == name) for panel_name in self.panels]

    def shown_values(self, name: str, settings: Mapping[str, Any]) -> list[Any]:
        """Updates of ``components`` that show ``settings`` in the named method's panel."""
        return [value for panel_name, panel in self.panels.items()
                for value in (panel.shown_values(settings) if panel_name == name
                              else [gr.update()] * len(panel.controls))]


def method_controls(method_name: str, method_class: type[CompositionMethod]) -> list[SettingControl]:
    """A control for each setting of the method (``method_settings``) that the UI can edit."""
    fields = {field.name: field for field in dataclasses.fields(method_class)}
    controls = []
    for setting in method_settings(method_class):
        factory = FIELD_CONTROLS.get((method_name, setting.name)) or default_factory(setting)
        hint = typing.Optional[setting.hint] if setting.optional else setting.hint  # noqa: UP045 - a runtime type
        control = factory(method_name, fields[setting.name], hint, setting.default, setting.help)
        if control is not None:
            controls.append(control)
    return controls


def default_factory(setting: Setting) -> ControlFactory:
    """The control by type; a dropdown where the field lists its values (metadata ``choices``, a
    Literal) or its docstring quotes them (with other values allowed)."""
    if setting.choices:
        return choice_control(*setting.choices)
    if setting.hint is str and setting.default in setting.suggestions and len(setting.suggestions) > 1:
        return choice_control(*setting.suggestions, allow_custom_value=True)
    return default_control


# ------------------------------------------------------------------------------------ controls by type


def default_control(method: str, field: dataclasses.Field, hint: Any, default: Any,
                    help_text: str) -> SettingControl | None:
    """The control for a field, chosen by its type hint; None for a type the UI cannot edit."""
    label, info = field.name.replace("_", " "), help_text or None
    optional, hint = strip_optional(hint)
    origin = typing.get_origin(hint)
    if optional or origin in (tuple, list, dict):
        return _text_control(method, field.name, label, hint, default, info or "", optional)
    if hint is bool:
        return SettingControl(field.name, gr.Checkbox(value=bool(default), label=label, info=info),
                              bool, bool)
    if hint in (int, float):
        component = gr.Number(value=default, label=label, info=info, precision=0 if hint is int else None)
        return SettingControl(field.name, component, _number_parser(method, label, hint), lambda value: value)
    if hint is str:
        return SettingControl(field.name, gr.Textbox(value=default, label=label, info=info),
                              lambda value: str(value or "").strip(), lambda value: value)
    return None


def choice_control(*choices: Any, allow_custom_value: bool = False) -> ControlFactory:
    """A factory for a field with a set of values (``allow_custom_value``: suggested ones)."""

    def factory(method: str, field: dataclasses.Field, hint: Any, default: Any, help_text: str) -> SettingControl:
        component = gr.Dropdown(list(choices), value=default, label=field.name.replace("_", " "),
                                info=help_text or None, allow_custom_value=allow_custom_value)
        return SettingControl(field.name, component, lambda value: value, lambda value: value)

    return factory


def box_list_control(method: str, field: dataclasses.Field, hint: Any, default: Any, help_text: str) -> SettingControl:
    """LoRA-Composer's boxes: ``x0,y0,x1,y1`` (relative, y down) per ticked LoRA, ``;`` between them;
    the Concepts view draws them on the result."""
    from loracompose.methods.composer import parse_box

    component = gr.Textbox(
        value="", label="boxes", placeholder="side by side", elem_id=f"{method}-boxes",
        info="One box per ticked LoRA, in table order: x0,y0,x1,y1 relative to the image (0..1, y down), "
             "separated by ';', e.g. 0,0,0.5,1; 0.5,0,1,1. Empty: the LoRAs side by side.",
    )

    def parse(text: Any) -> Any:
        parts = [part for part in str(text or "").split(";") if part.strip()]
        return tuple(parse_box(part) for part in parts) or None

    def show(boxes: Any) -> str:
        corners = [box.values() if isinstance(box, dict) else box for box in boxes or ()]
        return "; ".join(",".join(f"{value:g}" for value in box) for box in corners)

    return SettingControl(field.name, component, parse, show)


def per_lora_lines_control(placeholder: str, info: str, blank: Any) -> ControlFactory:
    """A text per ticked LoRA, one per line in table order; ``blank`` stands for an empty line
    (e.g. None: the default) and for a box left empty (``()``, or None when the field is optional)."""

    def factory(method: str, field: dataclasses.Field, hint: Any, default: Any, help_text: str) -> SettingControl:
        component = gr.Textbox(value="", label=field.name.replace("_", " "), lines=2, placeholder=placeholder,
                               info=f"One line per ticked LoRA, in table order; {info}")

        def parse(text: Any) -> Any:
            lines = [line.strip() or blank for line in str(text or "").rstrip().splitlines()]
            return tuple(lines) if any(lines) else default

        return SettingControl(field.name, component, parse, lambda texts: "\n".join(t or "" for t in texts or ()))

    return factory



def box_editor(panel: MethodPanel) -> None:
    """Under the Composer panel: a canvas to draw the boxes on (one layer per LoRA, in table order; a
    layer's strokes span its box) that fills in the boxes text, and a live drawing of that text."""
    from .method_views import CONCEPT_COLOURS, box_layout, boxes_from_drawing

    boxes = typing.cast(gr.Textbox, next(control.component for control in panel.controls
                                         if control.field_name == "boxes"))
    blank = np.full((256, 256, 4), 255, dtype=np.uint8)
    editor = gr.ImageEditor(
        value={"background": blank, "layers": [], "composite": None}, type="numpy", sources=(), height=280,
        label="Draw the boxes: add one layer per ticked LoRA (table order) and scribble over its area",
        brush=gr.Brush(colors=["#{:02x}{:02x}{:02x}".format(*rgb) for rgb in CONCEPT_COLOURS], color_mode="fixed"),
        elem_id=f"{panel.name}-box-editor",
    )
    preview = gr.Image(label="Box layout (numbers: ticked LoRAs in table order)", interactive=False, height=200,
                       elem_id=f"{panel.name}-box-layout")
    editor.change(boxes_from_drawing, editor, boxes, api_name="boxes_from_drawing", concurrency_limit=None)
    boxes.change(box_layout, boxes, preview, api_name="box_layout", concurrency_limit=None)


MASK_CANVAS = 256  # pixels on the longer side of the blank mask canvas (it takes the image's aspect ratio)
MASK_FOLDER = Path(tempfile.gettempdir()) / "loracompose-ui-masks"  # painted masks, by content hash


def mask_editor_control(method: str, field: dataclasses.Field, hint: Any, default: Any,
                        help_text: str) -> SettingControl:
    """Regional's masks: a canvas with one layer per ticked LoRA (table order); what is painted on
    layer k is LoRA k's region. Each mask is saved as a grayscale PNG (white = painted) whose path is
    the setting, so the sidecar names the exact masks. Nothing painted: no masks (boxes or side by side)."""
    from .method_views import CONCEPT_COLOURS

    blank = np.full((MASK_CANVAS, MASK_CANVAS, 4), 255, dtype=np.uint8)
    component = gr.ImageEditor(
        value={"background": blank, "layers": [], "composite": None}, type="numpy", sources=("upload",),
        height=300, canvas_size=(MASK_CANVAS, MASK_CANVAS), elem_id=f"{method}-masks",
        label="masks: add one layer per ticked LoRA (table order) and paint its region; the canvas stands for "
              "the image (or upload a picture of the image's shape to paint on it)",
        brush=gr.Brush(colors=["#{:02x}{:02x}{:02x}".format(*rgb) for rgb in CONCEPT_COLOURS], color_mode="fixed"),
    )

    def parse(value: Any) -> tuple[str, ...] | None:
        masks = painted_masks(value)
        return tuple(str(save_mask(mask)) for mask in masks) if masks else None

    def show(paths: Any) -> Any:
        files = [Path(path) for path in paths or ()]
        if not files:
            return {"background": blank, "layers": [], "composite": None}
        if not all(isinstance(path, (str, Path)) and Path(path).is_file() for path in paths):
            return gr.update()  # masks given as tensors, or files since removed: keep the canvas
        layers = [mask_layer(file, CONCEPT_COLOURS[index % len(CONCEPT_COLOURS)]) for index, file in enumerate(files)]
        background = np.full((*layers[0].shape[:2], 4), 255, dtype=np.uint8)
        return {"background": background, "layers": layers, "composite": None}

    return SettingControl(field.name, component, parse, show)


def painted_masks(value: Any) -> list[np.ndarray]:
    """One bool mask per editor layer (painted = alpha above zero), trailing unpainted layers dropped;
    an unpainted layer between painted ones is an empty region (that LoRA is drawn nowhere)."""
    masks = [np.asarray(layer)[..., -1] > 0 for layer in (value or {}).get("layers") or []]
    while masks and not masks[-1].any():
        masks.pop()
    return masks


def save_mask(mask: np.ndarray) -> Path:
    """``mask`` as a grayscale PNG under :data:`MASK_FOLDER`, named by its content (written atomically)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buffer, format="PNG")
    data = buffer.getvalue()
    MASK_FOLDER.mkdir(parents=True, exist_ok=True)
    path = MASK_FOLDER / f"mask-{hashlib.sha256(data).hexdigest()[:20]}.png"
    return path if path.exists() else atomic_write(path, partial(_write_bytes, data))


def _write_bytes(data: bytes, path: Path) -> None:
    path.write_bytes(data)


def mask_layer(path: Path, rgb: tuple[int, int, int]) -> np.ndarray:
    """An editor layer showing a mask file: ``rgb`` where the mask is white (half or more), clear elsewhere."""
    with Image.open(path) as image:
        inside = np.asarray(image.convert("L")) >= 128
    layer = np.zeros((*inside.shape, 4), dtype=np.uint8)
    layer[inside] = (*rgb, 255)
    return layer


def box_preview(panel: MethodPanel) -> None:
    """Under a panel with a boxes text: a live drawing of the typed boxes."""
    from .method_views import box_layout

    boxes = typing.cast(gr.Textbox, next(control.component for control in panel.controls
                                         if control.field_name == "boxes"))
    preview = gr.Image(label="Box layout (numbers: ticked LoRAs in table order)", interactive=False, height=200,
                       elem_id=f"{panel.name}-box-layout")
    boxes.change(box_layout, boxes, preview, api_visibility="private", concurrency_limit=None)


def mask_canvas_follows_size(panel: MethodPanel) -> None:
    """Regional's extras: the box layout preview, and a blank mask canvas that takes the image's aspect
    ratio when the page's width or height changes (a painted canvas is left as it is)."""
    box_preview(panel)
    canvas = next(control.component for control in panel.controls if control.field_name == "masks")
    root = gr.context.Context.root_block
    found = {block.elem_id: block for block in (root.blocks.values() if root is not None else ())
             if isinstance(block, gr.Number) and block.elem_id in ("width", "height")}
    if set(found) == {"width", "height"}:
        for size in found.values():
            size.change(fit_mask_canvas, [found["width"], found["height"], canvas], canvas,
                        api_visibility="private", concurrency_limit=None)


def fit_mask_canvas(width: Any, height: Any, value: Any) -> Any:
    """A blank canvas of the image's aspect ratio (longer side :data:`MASK_CANVAS`), unless something
    is painted or the size is not a positive number."""
    try:
        width, height = float(width), float(height)
    except (TypeError, ValueError):
        return gr.update()
    if painted_masks(value) or not (width > 0 and height > 0):
        return gr.update()
    scale = MASK_CANVAS / max(width, height)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)), 4)
    return {"background": np.full(shape, 255, dtype=np.uint8), "layers": [], "composite": None}


FIELD_CONTROLS[("regional", "boxes")] = box_list_control
FIELD_CONTROLS[("regional", "masks")] = mask_editor_control
FIELD_CONTROLS[("regional", "region_prompts")] = per_lora_lines_control(
    "the prompt", "an empty line uses the prompt.", None)
PANEL_EXTRAS["regional"] = mask_canvas_follows_size
FIELD_CONTROLS[("composer", "boxes")] = box_list_control
PANEL_EXTRAS["composer"] = box_editor
FIELD_CONTROLS[("composer", "region_prompts")] = per_lora_lines_control(
    "trigger words", "an empty line uses its trigger words.", None)
FIELD_CONTROLS[("clora", "prompts")] = per_lora_lines_control(
    "prompt + trigger words", "an empty line: the prompt with its trigger words.", "")
FIELD_CONTROLS[("clora", "subjects")] = per_lora_lines_control(
    "none", "words naming its concept besides its trigger words, comma-separated.", "")


def _number_parser(method: str, label: str, kind: type) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if value is None or value == "":
            raise UserError(f"{method} {label}: give a number")
        try:
            number = kind(float(value)) if kind is int else float(value)
        except (TypeError, ValueError):
            raise UserError(f"{method} {label}: {value!r} is not a number") from None
        if kind is int and number != float(value):
            raise UserError(f"{method} {label}: {value!r} must be a whole number")
        return number
    return parse


def _text_control(method: str, name: str, label: str, hint: Any, default: Any, help_text: str,
                  optional: bool) -> SettingControl:
    """A text box for tuples, lists, dicts and optional values; empty means None (automatic)."""
    example = _format_example(hint)
    empty = "Empty = default/automatic." if optional else ""
    info = " ".join(part for part in (help_text, f"Format: {example}.", empty) if part)
    component = gr.Textbox(value=format_setting(default), label=label, info=info,
                           placeholder="automatic" if optional else None)

    def parse(text: Any) -> Any:
        text = str(text or "").strip()
        if not text:
            if optional:
                return None
            if _variable_length(hint):
                return typing.get_origin(hint)()
            raise UserError(f"{method} {label}: give a value ({example})")
        return parse_setting(text, hint, f"{method} {label}")

    return SettingControl(name, component, parse, format_setting)


def _variable_length(hint: Any) -> bool:
    """A ``tuple[X, ...]``, ``list[X]`` or ``dict[K, V]``: empty is a valid value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    return origin in (list, dict) or (origin is tuple and bool(args) and args[-1] is Ellipsis)


def _format_example(hint: Any) -> str:
    """How to type a value of this type, e.g. ``comma-separated numbers, e.g. 1, 0.5``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list):
        kind = "whole numbers, e.g. 2, 3" if int in args else "numbers, e.g. 1, 0.5"
        return f"comma-separated {kind}"
    if origin is dict:
        value = "a number" if len(args) == 2 and args[1] in (int, float) else "a word"
        return f"LoRA name=value pairs (value: {value}), e.g. character=..., style=..."
    return {int: "a whole number", float: "a number"}.get(hint, "a value")


def format_setting(value: Any) -> str:
    """A field value as the text its box shows."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{key}={val}" for key, val in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def parse_setting(text: str, hint: Any, label: str) -> Any:
    """Text -> value of type ``hint`` (tuple/list of numbers, dict of name=value, or a scalar)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list):
        items = [item.strip() for item in text.split(",") if item.strip()]
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if fixed and len(items) != len(args):
            raise UserError(f"{label}: give {len(args)} comma-separated values, got {len(items)}")
        kinds = args if fixed else [args[0] if args else float] * len(items)
        values = [_scalar(item, kind, label) for item, kind in zip(items, kinds)]
        return tuple(values) if origin is tuple else values
    if origin is dict:
        value_kind = args[1] if len(args) == 2 else str
        pairs = [pair.strip() for pair in text.split(",") if pair.strip()]
        parsed = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise UserError(f"{label}: {pair!r} is not name=value")
            parsed[key.strip()] = _scalar(value.strip(), value_kind, label)
        return parsed
    return _scalar(text, hint, label)


def _scalar(text: str, kind: Any, label: str) -> Any:
    try:
        if kind is bool:
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"{label}: {text!r} is not a valid {getattr(kind, '__name__', 'value')}") from None
