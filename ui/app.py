"""The Gradio app: LoRA panel, method picker, generate with gallery and downloads, compare tab.

Endpoints (``api_name``):

* ``/generate``: named, typed parameters (ui/api.py): prompt, LoRAs by name -> strength, method, its
  settings as a JSON object of its dataclass fields, the generation settings and region masks
  (uploaded files, for regional) -> one entry per image (PNG, sidecar, caption, seed, cost; the first
  also the method's concept view). Stateless: it sees the server's library, not uploaded LoRAs.
* ``/generate_form`` (undocumented): the page's Generate button: the shared controls, method, then
  every method's controls in panel order -> gallery (newest first, settings in captions), downloads,
  status, and the latest result's concept view (LoRA-Composer boxes, CLoRA masks; ui/method_views.py).
* ``/compare``: the shared controls, the methods to compare, then every method's controls ->
  one image per method (same seed) with time and UNet calls, and a stats table.
* ``/upload_loras``: LoRA table and ``.safetensors`` files -> table with the uploads added.
* ``/reuse_settings``: puts the selected result's settings back into the controls.
* ``/suggest_loras``: prompt, LoRA table, how many -> the table with the best-fitting LoRAs ticked.

Per-session data (LoRAs, results) lives in a ``gr.State``; the pipeline is shared. Gradio's queue
starts up to ``WAITING_SESSIONS`` pipeline events at once and ui/turns.py hands the pipeline to one at
a time, one request per session, sessions in arrival order: a small request waits for at most one
request of each session ahead of it, never for a queue of one user's requests.

Annotations here are real objects (no ``from __future__ import annotations``): Gradio finds
``gr.SelectData``, ``gr.Request`` and ``gr.Progress`` parameters by inspecting the handlers' signatures.
"""

import functools
import logging
import os
import re
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gradio as gr
from PIL import Image

from loracompose import METHODS
from loracompose.methods import DEFAULT_METHOD
from loracompose.errors import UserError, first_line
from loracompose.methods.base import CompositionMethod
from loracompose.pipelines.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from loracompose.validation import Limits, check_generation_numbers, finite_number, whole_number

from .api import (
    GeneratedImage, generate_endpoint, generated_image, method_from_settings, save_concepts, with_region_masks,
)
from .library import (
    READ_ONLY_COLUMNS, TABLE_HEADERS, TABLE_TYPES, LoraCatalog, LoraEntry, UploadStore, describe_lora_file,
    selected_specs, table_rows,
)
from .method_forms import MethodForms
from .method_views import method_view
from .results import GenerationRequest, ResultItem, SessionState, run_generation
from .turns import PipelineTurns

log = logging.getLogger(__name__)

# Pipeline events Gradio starts at once; they wait in PipelineTurns, which runs one at a time.
WAITING_SESSIONS = 16
PIPELINE_EVENTS = "pipeline"
QUEUE_SIZE = 64
DEFAULT_STEPS = 30
MAX_IMAGES = 8
MAX_GUIDANCE = 50.0
SIZE_STEP = 8


@dataclass(frozen=True)
class AppSettings:
    """What the app serves: model label, library, folders for outputs and uploads, defaults."""

    model_label: str
    library: tuple[LoraEntry, ...]
    output_root: Path
    upload_root: Path
    default_prompt: str = ""
    default_steps: int = DEFAULT_STEPS
    default_guidance: float | None = None  # None: the model's own (SD1.5/SDXL 7.5, FLUX 3.5, SD3 7)
    preselect_library: bool = False
    max_upload_bytes: int = 512 * 1024**2
    title: str = "loracompose"
    lora_dir: Path | None = None  # the library folder: <lora:NAME:W> prompt tags pick NAME.safetensors from it


def readable_errors(handler: Callable) -> Callable:
    """Turn a UserError into a one-line ``gr.Error`` in the page; never show a stack trace."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as error:
            raise gr.Error(hide_server_paths(str(error)), print_exception=False) from None
        except Exception as error:  # a bug, not a bad input: log it, show one line (no server paths)
            log.exception("UI event %s failed", handler.__name__)
            raise gr.Error(f"internal error ({type(error).__name__}: {hide_server_paths(first_line(error))}); "
                           "see the server log", print_exception=False) from None

    return wrapper


# An absolute POSIX path: '/' then folders; the last part (the file name) is all a client is shown.
_SERVER_PATH = re.compile(r"(?<![\w.~:/])/(?:[^\s/'\"(),;]+/)+(?=[^\s/'\"(),;]*)")


def hide_server_paths(text: str) -> str:
    """``text`` with every absolute path cut to its file name: an error shown in the page or sent to an
    API client never tells where the server keeps its files, or which files exist."""
    return _SERVER_PATH.sub("", text)


def _generation_request(state: SessionState, prompt: str, negative_prompt: str, table: Any, seed: Any, steps: Any,
                        guidance: Any, width: Any, height: Any, num_images: Any, scheduler: str,
                        append_triggers: bool, text_encoder_loras: bool,
                        limits: Limits | None = None) -> GenerationRequest:
    """The shared controls' values as a checked request (UserError for a bad value; the same checks
    as the CLI and the Python API, loracompose.validation)."""
    if width is None or height is None:
        raise UserError("width and height: give both image sizes in pixels")
    numbers = check_generation_numbers(
        steps=steps, guidance_scale=finite_number(guidance, "guidance", low=0, high=MAX_GUIDANCE),
        num_images=whole_number(num_images, "number of images", low=1, high=MAX_IMAGES), seed=seed,
        width=width, height=height, limits=limits)
    return GenerationRequest(
        prompt=str(prompt or ""), negative_prompt=str(negative_prompt or "").strip() or None,
        loras=tuple(selected_specs(table_rows(table), state.catalog)), seed=numbers.seed, steps=numbers.steps,
        guidance_scale=numbers.guidance_scale, width=int(numbers.width or 0), height=int(numbers.height or 0),
        num_images=numbers.num_images, scheduler=str(scheduler), append_triggers=bool(append_triggers),
        text_encoder_loras=bool(text_encoder_loras), lora_dir=state.lora_dir,
    )


class LoraComposeApp:
    """The event handlers around one pipeline; :meth:`build` lays out the page."""

    def __init__(self, pipe: Any, settings: AppSettings, methods: Mapping[str, type[CompositionMethod]] = METHODS):
        self.pipe = pipe
        self.settings = settings
        # Only the methods that run on this model's family; the first is the dropdown's and /generate's default.
        self.methods = default_first(methods_for_pipeline(methods, pipe))
        self.schedulers = schedulers_for_pipeline(pipe)
        self.default_scheduler = getattr(pipe, "default_scheduler", DEFAULT_SCHEDULER)
        self.default_guidance = (settings.default_guidance if settings.default_guidance is not None
                                 else getattr(pipe, "default_guidance_scale", 7.5))
        self.uploads = UploadStore(settings.upload_root, settings.max_upload_bytes)
        self.default_size = pipe.native_size
        self.limits: Limits = getattr(pipe, "limits", Limits())
        self.turns = PipelineTurns()  # who holds the shared pipeline now, and who waits
        if hasattr(pipe, "verify_clean") and not pipe.verify_clean:
            pipe.verify_clean = "quick"  # one model shared by every user: checked after every request

    # ------------------------------------------------------------------ session
    def new_session(self) -> SessionState:
        return SessionState(catalog=LoraCatalog(self.settings.library), lora_dir=self.settings.lora_dir)

    def initial_table(self) -> list[list[Any]]:
        catalog = LoraCatalog(self.settings.library)
        return catalog.table(list(catalog.entries) if self.settings.preselect_library else [])

    # ------------------------------------------------------------------ events
    @readable_errors
    def generate(self, state: SessionState, prompt: str, negative_prompt: str, table: Any, seed: Any, steps: Any,
                 guidance: Any, width: Any, height: Any, num_images: Any, scheduler: str, append_triggers: bool,
                 text_encoder_loras: bool, method_name: str, session: gr.Request,
                 progress: gr.Progress = gr.Progress(track_tqdm=True), *method_values: Any) -> tuple:
        """Generate with the picked method; results go first in the session's gallery."""
        request = _generation_request(state, prompt, negative_prompt, table, seed, steps, guidance, width, height,
                                      num_images, scheduler, append_triggers, text_encoder_loras, self.limits)
        method = self.forms.method(method_name, method_values)
        with self._pipeline_turn(session, progress):
            progress(0, desc=f"{method_name}: preparing")
            items = run_generation(self.pipe, request, method, state.output_folder(self.settings.output_root),
                                   self.settings.model_label)
        state.remember(items)
        with Image.open(items[0].png) as image:
            overlays, note = method_view(method, image)
        summary = _summary(items) + (f"  \n{note}" if note else "")
        return state, state.gallery(), self._downloads(state), summary, overlays

    @readable_errors
    def generate_api(self, *, prompt: str, loras: Mapping[str, float], method: str, method_settings: Mapping[str, Any],
                     negative_prompt: str, seed: int, steps: int, guidance_scale: float, width: int, height: int,
                     num_images: int, scheduler: str, append_triggers: bool, text_encoder_loras: bool,
                     trigger_words: Mapping[str, Sequence[str]], region_masks: Mapping[str, Any],
                     request: gr.Request | None = None) -> list[GeneratedImage]:
        """The named ``/generate`` endpoint (ui/api.py): LoRAs by name from the server's library."""
        state = self.new_session()
        table = self._api_table(state, loras, trigger_words)
        generation = _generation_request(state, prompt, negative_prompt, table, seed, steps, guidance_scale, width,
                                         height, num_images, scheduler, append_triggers, text_encoder_loras,
                                         self.limits)
        if method not in self.methods:
            raise UserError(f"method {method!r} is not available; choose one of {', '.join(self.methods)}")
        categories = {str(spec.name): spec.category for spec in generation.loras}  # UI specs are named
        method_settings = with_region_masks(method, self.methods[method], method_settings, region_masks, categories)
        chosen = method_from_settings(method, self.methods[method], method_settings)
        with self._pipeline_turn(request):
            items = run_generation(self.pipe, generation, chosen, state.output_folder(self.settings.output_root),
                                   self.settings.model_label)
        concepts = save_concepts(chosen, items[0])  # the method's view of the first image, as the page shows
        return [generated_image(item, concepts if index == 0 else ()) for index, item in enumerate(items)]

    @readable_errors
    def compare(self, state: SessionState, prompt: str, negative_prompt: str, table: Any, seed: Any, steps: Any,
                guidance: Any, width: Any, height: Any, num_images: Any, scheduler: str, append_triggers: bool,
                text_encoder_loras: bool, method_names: list[str], session: gr.Request,
                progress: gr.Progress = gr.Progress(track_tqdm=True), *method_values: Any) -> tuple:
        """One image per chosen method, same prompt, LoRAs and seed, each with its time and UNet calls."""
        if not method_names:
            raise UserError("compare: tick at least one method")
        request = _generation_request(state, prompt, negative_prompt, table, seed, steps, guidance, width, height,
                                      1, scheduler, append_triggers, text_encoder_loras, self.limits)
        methods = [self.forms.method(name, method_values) for name in method_names]  # check all before running
        items: list[ResultItem] = []
        with self._pipeline_turn(session, progress):
            for index, method in enumerate(methods):
                progress(index / len(methods), desc=f"{method.name} ({index + 1}/{len(methods)})")
                items += run_generation(self.pipe, request, method, state.output_folder(self.settings.output_root),
                                        self.settings.model_label)
        state.remember(items)
        side_by_side = [(str(item.png), f"{item.method_name} · {item.seconds:.2f} s · {item.unet_calls} UNet calls")
                        for item in items]
        stats = [[item.method_name, round(item.seconds, 3), item.unet_calls] for item in items]
        return state, side_by_side, stats, state.gallery(), self._downloads(state)

    @readable_errors
    def upload(self, state: SessionState, table: Any, files: list[str] | None) -> tuple:
        """Check and store uploaded LoRAs, and add them (ticked) to the table."""
        rows = table_rows(table)
        added, refused = [], []
        for file in files or []:
            try:
                source = uploaded_file(file)
                stored = self.uploads.store(source, source.name)
                added.append(state.catalog.add(describe_lora_file(stored, stored.stem, "upload")))
            except UserError as error:
                refused.append(hide_server_paths(str(error)))
        if refused and not added:
            raise UserError("; ".join(refused))
        if refused:
            gr.Warning("; ".join(refused))
        known = {str(row[1]) for row in rows if len(row) > 1}
        rows += [entry.table_row(True) for entry in added if entry.name not in known]
        message = f"added {', '.join(entry.name for entry in added)}" if added else ""
        return state, rows, None, message

    @readable_errors
    def suggest(self, state: SessionState, prompt: str, table: Any, count: Any, session: gr.Request) -> tuple:
        """Tick the session's LoRAs that best fit the prompt (AutoLoRA's training-free retrieval: the
        model's text encoder on each LoRA's name, triggers, category and description)."""
        from loracompose.retrieval import rank_lora_files

        top_k = whole_number(count, "number of LoRAs to suggest", low=1, high=len(state.catalog.entries) or 1)
        with self._pipeline_turn(session), self.pipe.exclusive():
            ranked = rank_lora_files(self.pipe, str(prompt or ""), {entry.name: entry.path for entry in
                                                                    state.catalog.entries.values()}, top_k)
        chosen = {item.entry.name: item for item in ranked}
        rows = [[str(row[1]) in chosen, *row[1:]] for row in table_rows(table)]
        message = "suggested: " + ", ".join(
            f"{name} ({item.score:.2f}{', trigger in prompt' if item.trigger_match else ''})"
            for name, item in chosen.items())
        return rows, message

    @readable_errors
    def select_result(self, state: SessionState, evt: gr.SelectData) -> tuple:
        """Remember which result is selected and offer its image and sidecar for download."""
        state.selected = evt.index if isinstance(evt.index, int) else None
        return state, self._downloads(state)

    @readable_errors
    def show_lora(self, state: SessionState, table: Any, evt: gr.SelectData) -> dict[str, Any]:
        """Category, trigger words and metadata of the LoRA in the clicked row."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        rows = table_rows(table)
        if not isinstance(row, int) or not 0 <= row < len(rows):
            return {}
        return state.catalog.get(str(rows[row][1])).details()

    @readable_errors
    def reuse(self, state: SessionState, table: Any) -> list[Any]:
        """The selected result's prompt, LoRAs, settings and method put back into the controls."""
        item = state.selected_item()
        if item is None:
            raise UserError("reuse settings: generate an image and select it in the gallery first")
        request = item.request
        return [
            request.prompt, request.negative_prompt or "", self._table_for(table, request), request.seed,
            request.steps, request.guidance_scale, request.width, request.height, request.num_images,
            request.scheduler, request.append_triggers, request.text_encoder_loras, item.method_name,
            *self.forms.visibility(item.method_name),
            *self.forms.shown_values(item.method_name, item.method_settings),
        ]

    @staticmethod
    def _api_table(state: SessionState, loras: Any, trigger_words: Any) -> list[list[Any]]:
        """LoRA table rows (ticked, in the given order) for ``/generate``'s ``loras`` and ``trigger_words``."""
        for label, value in (("loras", loras), ("trigger_words", trigger_words)):
            if not isinstance(value or {}, Mapping):
                raise UserError(f"{label}: give a JSON object keyed by LoRA name, not {value!r}")
        loras, trigger_words = loras or {}, trigger_words or {}
        for name in [*loras, *trigger_words]:
            if name not in state.catalog.entries:
                raise UserError(f"LoRA {name!r} is not in this server's library; use one of "
                                f"{', '.join(state.catalog.entries) or 'none (start the UI with --library)'}")
        stray = sorted(set(trigger_words) - set(loras))
        if stray:
            raise UserError(f"trigger_words: {', '.join(stray)} not in loras; give trigger words only for used LoRAs")
        rows = []
        for name, weight in loras.items():
            words = trigger_words.get(name, state.catalog.get(name).trigger_words)
            if isinstance(words, str):
                words = [words]
            rows.append([True, name, weight, ", ".join(str(word) for word in words)])
        return rows

    def _table_for(self, table: Any, request: GenerationRequest) -> list[list[Any]]:
        used = {str(spec.name): spec for spec in request.loras}  # the UI names every LoRA
        rows = []
        for row in table_rows(table):
            spec = used.get(str(row[1]))
            if spec is None:
                rows.append([False, *row[1:]])
            else:
                rows.append([True, row[1], spec.weight, ", ".join(spec.trigger_words or ()), *row[4:]])
        missing = sorted(set(used) - {str(row[1]) for row in rows})
        if missing:
            gr.Warning(f"reuse settings: LoRA(s) {', '.join(missing)} are no longer in this session; upload them again")
        return rows

    def _pipeline_turn(self, session: gr.Request | None,
                       progress: gr.Progress | None = None) -> AbstractContextManager[None]:
        """Hold the shared pipeline for this session's request (ui/turns.py); the page shows the wait.
        A caller without a session (Gradio's plain HTTP call route) gets a turn of its own."""
        session_id = getattr(session, "session_hash", None) or uuid.uuid4().hex

        def show_wait(ahead: int) -> None:
            if progress is not None:
                progress(0, desc=f"waiting for the model: {ahead} request(s) ahead")

        return self.turns.turn(session_id, show_wait)

    def _downloads(self, state: SessionState) -> list[str]:
        item = state.selected_item()
        return [str(item.png), str(item.sidecar)] if item else []

    # ------------------------------------------------------------------ layout
    def build(self) -> gr.Blocks:
        """The page with its queue set (pipeline events take turns, ui/turns.py); serve it with :func:`launch_app`."""
        with gr.Blocks(title=self.settings.title, delete_cache=(3600, 24 * 3600)) as blocks:
            state = gr.State(self.new_session())
            gr.Markdown(f"# {self.settings.title}\nTraining-free multi-LoRA composition · model: "
                        f"`{self.settings.model_label}`")
            with gr.Row():
                with gr.Column(scale=2):
                    shared = self._shared_controls(state)
                with gr.Column(scale=3), gr.Tabs():
                    with gr.Tab("Generate"):
                        generate_outputs, gallery, downloads = self._generate_tab(state, shared)
                    with gr.Tab("Compare"):
                        self._compare_tab(state, shared, gallery, downloads)
            self._wire_reuse(state, shared, generate_outputs)
        blocks.queue(default_concurrency_limit=WAITING_SESSIONS, max_size=QUEUE_SIZE)
        return blocks

    def _shared_controls(self, state: gr.State) -> list[gr.components.Component]:
        prompt = gr.Textbox(label="Prompt", value=self.settings.default_prompt, lines=2, elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
        with gr.Accordion("LoRAs", open=True):
            table = gr.Dataframe(
                value=self.initial_table(), headers=TABLE_HEADERS, datatype=TABLE_TYPES, type="array",
                static_columns=READ_ONLY_COLUMNS, interactive=True, label="Tick LoRAs, set weight and trigger words",
                elem_id="lora-table",
            )
            details = gr.JSON(label="Selected LoRA: category and metadata", open=False)
            upload = gr.File(label=f"Upload .safetensors LoRAs (up to {self.settings.max_upload_bytes // 1024**2} MiB)",
                             file_count="multiple", file_types=[".safetensors"], elem_id="lora-upload")
            upload_status = gr.Markdown()
            with gr.Row():
                suggest_count = gr.Number(value=2, precision=0, minimum=1, label="How many", scale=1)
                suggest = gr.Button("Suggest LoRAs for the prompt", elem_id="suggest", scale=3)
        with gr.Accordion("Generation settings", open=True):
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                steps = gr.Slider(1, 150, value=self.settings.default_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(0, 20, value=self.default_guidance, step=0.5, label="Guidance (CFG)")
            with gr.Row():
                width = gr.Number(label="Width", value=self.default_size, precision=0, step=SIZE_STEP, elem_id="width")
                height = gr.Number(label="Height", value=self.default_size, precision=0, step=SIZE_STEP,
                                   elem_id="height")
                num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
            with gr.Row():
                scheduler = gr.Dropdown(self.schedulers, value=self.default_scheduler, label="Scheduler")
                append_triggers = gr.Checkbox(value=True, label="Append missing trigger words")
                text_encoder_loras = gr.Checkbox(value=True, label="LoRAs on the text encoder")
        table.select(self.show_lora, [state, table], details, api_visibility="private", concurrency_limit=None)
        suggest.click(self.suggest, [state, prompt, table, suggest_count], [table, upload_status],
                      api_name="suggest_loras", concurrency_id=PIPELINE_EVENTS)
        upload.upload(self.upload, [state, table, upload], [state, table, upload, upload_status],
                      api_name="upload_loras", concurrency_limit=None)
        return [prompt, negative, table, seed, steps, guidance, width, height, num_images, scheduler,
                append_triggers, text_encoder_loras]

    def _generate_tab(self, state: gr.State, shared: list) -> tuple[list, gr.Gallery, gr.File]:
        names = list(self.methods)
        method = gr.Dropdown(names, value=names[0], label="Composition method", elem_id="method")
        self.forms = MethodForms(self.methods, names[0])
        method.change(lambda name: self.forms.visibility(name), method, self.forms.groups,
                      api_visibility="private", concurrency_limit=None)
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(label="Results (newest first)", format="png", columns=3, height="auto",
                             elem_id="gallery", buttons=["download", "fullscreen"])
        reuse = gr.Button("Reuse settings of the selected result", elem_id="reuse")
        downloads = gr.File(label="Selected result: image and settings (JSON)", file_count="multiple",
                            interactive=False, elem_id="downloads")
        concepts = gr.Gallery(label="Concepts of the latest result (boxes, masks)", format="png", columns=4,
                              height="auto", elem_id="concept-view")
        button.click(self.generate, [state, *shared, method, *self.forms.components],
                     [state, gallery, downloads, status, concepts], api_name="generate_form",
                     api_visibility="undocumented", concurrency_id=PIPELINE_EVENTS)
        defaults = {"steps": self.settings.default_steps, "guidance_scale": self.default_guidance,
                    "width": self.default_size, "height": self.default_size, "scheduler": self.default_scheduler,
                    "schedulers": self.schedulers}
        gr.api(generate_endpoint(self.generate_api, self.methods, defaults), api_name="generate",
               concurrency_id=PIPELINE_EVENTS)
        gallery.select(self.select_result, [state], [state, downloads], api_visibility="private",
                       concurrency_limit=None)
        self.reuse_button = reuse
        return [method, *self.forms.groups, *self.forms.components], gallery, downloads

    def _compare_tab(self, state: gr.State, shared: list, gallery: gr.Gallery, downloads: gr.File) -> None:
        gr.Markdown("Same prompt, LoRAs and seed for every ticked method, one image each; each method uses "
                    "its settings from the Generate tab.")
        chosen = gr.CheckboxGroup(list(self.methods), value=list(self.methods), label="Methods",
                                  elem_id="compare-methods")
        button = gr.Button("Compare", variant="primary", elem_id="compare")
        side_by_side = gr.Gallery(label="Side by side", format="png", columns=min(len(self.methods), 5),
                                  height="auto", elem_id="compare-gallery")
        stats = gr.Dataframe(headers=["method", "seconds", "UNet calls"], datatype=["str", "number", "number"],
                             interactive=False, label="Cost", elem_id="compare-stats")
        button.click(self.compare, [state, *shared, chosen, *self.forms.components],
                     [state, side_by_side, stats, gallery, downloads], api_name="compare",
                     concurrency_id=PIPELINE_EVENTS)

    def _wire_reuse(self, state: gr.State, shared: list, generate_outputs: list) -> None:
        self.reuse_button.click(self.reuse, [state, shared[2]], [*shared, *generate_outputs],
                                api_name="reuse_settings", concurrency_limit=None)


def uploaded_file(file: Any) -> Path:
    """The server copy of a file the browser uploaded: a regular file inside Gradio's upload folder.
    Anything else (a client naming a server file in its FileData) is refused without saying whether
    that file exists."""
    from gradio.utils import get_upload_folder

    path = Path(str(getattr(file, "path", file)))
    folder = Path(get_upload_folder()).resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(folder) or not os.path.isfile(resolved) or os.path.islink(path):
        raise UserError(f"upload {path.name!r} refused: only files uploaded through this page are accepted; "
                        "upload the .safetensors file itself, or pick a LoRA of the library")
    return resolved


def _summary(items: Sequence[ResultItem]) -> str:
    if not items:
        return ""
    first = items[0]
    return f"**{first.method_name}**: {len(items)} image(s) in {first.seconds:.2f} s, {first.unet_calls} UNet calls"


def default_first(methods: Mapping[str, type[CompositionMethod]]) -> dict[str, type[CompositionMethod]]:
    """The methods in their order, but DEFAULT_METHOD (the CLI's default too) first where it is offered."""
    first = {name: methods[name] for name in (DEFAULT_METHOD,) if name in methods}
    return first | {name: method for name, method in methods.items() if name not in first}


def methods_for_pipeline(methods: Mapping[str, type[CompositionMethod]],
                         pipe: Any) -> dict[str, type[CompositionMethod]]:
    """The methods that run on ``pipe``'s model family (every one where the pipeline names none)."""
    family = getattr(pipe, "architecture", "")
    if not family:
        return dict(methods)
    return {name: method for name, method in methods.items() if family in getattr(method, "families", (family,))}


def schedulers_for_pipeline(pipe: Any) -> list[str]:
    """The sampler names ``pipe`` accepts (FLUX/SD3: their flow-matching Euler only), sorted."""
    check = getattr(pipe, "_check_scheduler", None)
    if check is None:
        return sorted(SCHEDULERS)
    accepted = []
    for name in sorted(SCHEDULERS):
        try:
            check(name)
        except UserError:
            continue
        accepted.append(name)
    return accepted


def build_app(pipe: Any, settings: AppSettings, methods: Mapping[str, type[CompositionMethod]] = METHODS) -> gr.Blocks:
    """The Blocks app around ``pipe``, with its queue set: pipeline events take turns (ui/turns.py)."""
    return LoraComposeApp(pipe, settings, methods).build()


def launch_app(blocks: gr.Blocks, settings: AppSettings, host: str = "127.0.0.1", port: int | None = None,
               block: bool = True, quiet: bool = False) -> gr.Blocks:
    """Serve the app; outputs are downloadable, uploads are never served back."""
    settings.output_root.mkdir(parents=True, exist_ok=True)
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet,
                  allowed_paths=[str(settings.output_root)], blocked_paths=[str(settings.upload_root)],
                  max_file_size=settings.max_upload_bytes, show_error=False)
    return blocks
