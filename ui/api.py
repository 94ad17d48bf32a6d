"""The app's named API: ``/generate`` with keyword parameters a gradio_client user reads from ``view_api()``.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    images = client.predict(prompt="a cat", loras={"character": 0.8, "outfit": 1.0}, method="composite",
                            method_settings={"mixing_weights": [0.6, 0.4]}, seed=3, api_name="/generate")

Method settings are a JSON object whose keys are the method's dataclass fields (the same names as in
the Python API and the sidecars); each value is checked against the field's type. Region masks (for
``regional``) are uploaded files, LoRA name -> mask image::

    client.predict(prompt="a cat and a dog", loras={"cat": 1.0, "dog": 1.0}, method="regional",
                   region_masks={"cat": handle_file("left.png"), "dog": handle_file("right.png")},
                   api_name="/generate") The page's own
form posts to an undocumented endpoint with one input per control (``ui/app.py``).
"""

from __future__ import annotations

import inspect
import typing
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, TypedDict

import gradio as gr
from gradio.data_classes import FileData
from PIL import Image

from loracompose.errors import UserError
from loracompose.kinds import is_global_kind
from loracompose.methods.base import CompositionMethod
from loracompose.methods.settings import build_method, method_settings, strip_optional
from loracompose.outputs import atomic_write
from loracompose.pipelines.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

from .method_views import method_view
from .results import ResultItem


class ConceptImage(TypedDict):
    """One picture of the method's view of an image (regions, automatic masks, boxes) and its caption."""

    image: dict[str, Any]
    caption: str


class GeneratedImage(TypedDict):
    """One image of a ``/generate`` call: the PNG, its settings sidecar (JSON) and what made it; the
    first image also carries the method's view of it (``concepts``: each LoRA's region or automatic
    mask for regional and auto), as the page's Concepts gallery shows it."""

    image: dict[str, Any]
    sidecar: dict[str, Any]
    caption: str
    seed: int
    method_settings: dict[str, Any]
    seconds: float
    unet_calls: int
    concepts: list[ConceptImage]


def generated_image(item: ResultItem, concepts: Sequence[tuple[Path, str]] = ()) -> GeneratedImage:
    """A result as the API returns it; the files are FileData, so gradio_client downloads them."""
    return GeneratedImage(
        image=_file(item.png), sidecar=_file(item.sidecar), caption=item.caption, seed=item.request.seed,
        method_settings=item.method_settings, seconds=item.seconds, unet_calls=item.unet_calls,
        concepts=[ConceptImage(image=_file(path), caption=caption) for path, caption in concepts],
    )


def _file(path: Path) -> dict[str, Any]:
    return FileData(path=str(path), orig_name=path.name).model_dump()


def save_concepts(method: CompositionMethod, item: ResultItem) -> list[tuple[Path, str]]:
    """The method's view of ``item``'s image (ui/method_views.py), each picture saved as a PNG beside it."""
    with Image.open(item.png) as image:
        overlays, _ = method_view(method, image)
    return [(atomic_write(item.png.with_name(f"{item.png.stem}-concept-{index}.png"), partial(_save_png, overlay)),
             caption) for index, (overlay, caption) in enumerate(overlays)]


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")


def generate_endpoint(handler: Callable[..., list[GeneratedImage]], methods: Mapping[str, type],
                      defaults: Mapping[str, Any]) -> Callable[..., list[GeneratedImage]]:
    """``handler`` (called with keyword arguments) under the signature ``gr.api`` publishes: the
    parameters of :func:`generate_signature`, choices as enums, the app's defaults."""

    signature = generate_signature(list(methods), defaults)

    def generate(*args: Any, **kwargs: Any) -> list[GeneratedImage]:
        bound = signature.bind(*args, **kwargs)  # Gradio passes the inputs by position
        bound.apply_defaults()
        return handler(**bound.arguments)

    generate.__doc__ = GENERATE_DESCRIPTION
    generate.__signature__ = signature  # type: ignore[attr-defined]
    generate.__annotations__ = {name: parameter.annotation for name, parameter in signature.parameters.items()}
    generate.__annotations__["return"] = signature.return_annotation
    return generate


GENERATE_DESCRIPTION = """Generate images with LoRAs composed by a method; returns one entry per image.

prompt: the prompt. loras: LoRA name -> strength, in composition order (names as in the page's table:
the server's library). method: the composition method. method_settings: the method's settings by field
name (e.g. {"period": 3} for switch); missing ones keep their defaults. trigger_words: LoRA name -> its
trigger words, replacing the library's. seed: image k uses seed + k. region_masks: LoRA name -> mask
image (white = its region; methods with a masks setting, e.g. regional), for every LoRA or for each
local one (style and background LoRAs then get the whole image). The rest as in the page. One request
per client session at a time: one sent while the session's previous request runs or waits is refused."""


def generate_signature(method_names: list[str], defaults: Mapping[str, Any]) -> inspect.Signature:
    """The named, typed parameters of ``/generate`` (keyword names as in ``pipe.generate``)."""
    method_choice = Literal[tuple(method_names)]  # type: ignore[valid-type]
    scheduler_choice = Literal[tuple(defaults.get("schedulers") or sorted(SCHEDULERS))]  # type: ignore[valid-type]
    parameters = [
        ("prompt", str, inspect.Parameter.empty),
        ("loras", dict[str, float], {}),
        ("method", method_choice, method_names[0]),
        ("method_settings", dict[str, Any], {}),
        ("negative_prompt", str, ""),
        ("seed", int, 0),
        ("steps", int, defaults["steps"]),
        ("guidance_scale", float, defaults["guidance_scale"]),
        ("width", int, defaults["width"]),
        ("height", int, defaults["height"]),
        ("num_images", int, 1),
        ("scheduler", scheduler_choice, defaults.get("scheduler", DEFAULT_SCHEDULER)),
        ("append_triggers", bool, True),
        ("text_encoder_loras", bool, True),
        ("trigger_words", dict[str, list[str]], {}),
        ("region_masks", dict[str, FileData], {}),
        ("request", gr.Request | None, None),  # Gradio fills it in (the caller's session); not an API input
    ]
    return inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                                annotation=hint) for name, hint, default in parameters],
                             return_annotation=list[GeneratedImage])


# ------------------------------------------------------------------------------------ method settings


def with_region_masks(method: str, method_class: type[CompositionMethod], settings: Any, region_masks: Any,
                      categories: Mapping[str, str | None]) -> Any:
    """``settings`` with ``masks`` set from ``/generate``'s ``region_masks`` (LoRA name -> uploaded
    file), in LoRA order; ``categories`` holds every LoRA of the request (name -> category)."""
    if not region_masks:
        return settings
    if not isinstance(region_masks, Mapping):
        raise UserError("region_masks: give a JSON object of LoRA name -> mask file, "
                        f"not {type(region_masks).__name__}")
    if "masks" not in {setting.name for setting in method_settings(method_class)}:
        raise UserError(f"region_masks: method {method} takes no masks; use method regional (or leave them out)")
    if isinstance(settings, Mapping) and settings.get("masks") is not None:
        raise UserError("region_masks and method_settings.masks both given; give the masks once")
    stray = [name for name in region_masks if name not in categories]
    if stray:
        raise UserError(f"region_masks: {', '.join(map(str, stray))} not in loras; give masks only for used LoRAs")
    local = {name for name, category in categories.items() if not is_global_kind(category)}
    if set(region_masks) not in (set(categories), local):
        missing = ", ".join(sorted(set(categories) - set(region_masks)))
        raise UserError(f"region_masks: no mask for {missing}; give one for every LoRA, or one for each local "
                        "LoRA (style and background LoRAs then get the whole image)")
    paths = [uploaded_path(region_masks[name], f"region_masks.{name}") for name in categories if name in region_masks]
    return {**(settings or {}), "masks": paths}


def uploaded_path(file: Any, label: str) -> str:
    """The server path of a file a client uploaded (a FileData object); a path outside Gradio's upload
    folder (a client naming a server file) is refused without saying whether it exists."""
    from gradio.utils import get_upload_folder

    path = file.get("path") if isinstance(file, Mapping) else None
    if not isinstance(path, str):
        raise UserError(f"{label}: give an uploaded file (gradio_client.handle_file(PATH)), not {file!r}")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(get_upload_folder()).resolve()) or not resolved.is_file():
        raise UserError(f"{label}: {Path(path).name!r} is not a file uploaded with this request; upload it with "
                        "gradio_client.handle_file(PATH)")
    return str(resolved)


def method_from_settings(name: str, method_class: type[CompositionMethod], settings: Any) -> CompositionMethod:
    """The method with ``settings`` (field name -> JSON value), each checked against its field's type."""
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise UserError(f"method_settings: give a JSON object of {name}'s settings, not {type(settings).__name__}")
    hints = {setting.name: Optional[setting.hint] if setting.optional else setting.hint  # noqa: UP045 - a runtime type
             for setting in method_settings(method_class)}
    values = {key: setting_value(value, hints.get(key, Any), f"method_settings.{key}")
              for key, value in settings.items()}
    return build_method(method_class, values, name)  # refuses unknown keys, naming the known ones


def setting_value(value: Any, hint: Any, label: str) -> Any:
    """A JSON value as a value of type ``hint`` (lists become tuples where the field is a tuple, an
    object the keyword arguments of a class such as Box); other values are left to the method's check."""
    optional, hint = strip_optional(hint)
    if value is None:
        if optional or hint is Any:
            return None
        raise UserError(f"{label}: null is not allowed here; give a value or leave the setting out")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{label}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        return _sequence_value(value, origin, args, label)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{label}: give an object (name -> value), not {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {str(key): setting_value(item, value_hint, f"{label}.{key}") for key, item in value.items()}
    return _scalar_value(value, hint, label)


def _sequence_value(value: Any, origin: type, args: tuple[Any, ...], label: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{label}: give a list, not {value!r}")
    variable = not args or args[-1] is Ellipsis or origin is list
    if not variable and len(value) != len(args):
        raise UserError(f"{label}: give {len(args)} values, got {len(value)}")
    hints = [args[0] if args else Any] * len(value) if variable else list(args)
    items = [setting_value(item, hint, f"{label}[{index}]") for index, (item, hint) in enumerate(zip(value, hints))]
    return tuple(items) if origin is tuple else items


def _scalar_value(value: Any, hint: Any, label: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{label}: give true or false, not {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{label}: give a number, not {value!r}")
        if hint is int and value != int(value):
            raise UserError(f"{label}: {value!r} must be a whole number")
        return int(value) if hint is int else float(value)
    if hint is str and not isinstance(value, str):
        raise UserError(f"{label}: give a string, not {value!r}")
    if isinstance(value, Mapping) and hint is not Any and typing.get_origin(hint) is None and callable(hint):
        try:  # a class's keyword arguments, as a sidecar writes a Box
            return hint(**value)
        except TypeError as error:
            raise UserError(f"{label}: {error}") from None
    return value
