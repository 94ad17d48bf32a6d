"""Benchmark suites: a YAML file naming a base model, LoRAs, composition sets, methods and seeds.

    suite  <- load_suite("suite.yaml")          # every field checked; bad input -> UserError
    jobs   <- suite.jobs()                      # the grid: set x seed x method, in that order
    job.id == "<set>--<method label>--s<seed>--<8 hex of everything that shapes the image>"

A job's id is a pure function of what it generates (model, LoRAs, prompt, method settings, seed,
size, steps...), so a rerun of the same suite finds its finished jobs and a changed setting makes
new ids instead of silently reusing old images. Relative paths resolve against the suite file's
folder. A ``composlora:`` section expands to the ComposLoRA testbed (composlora.py), a ``toyworld:``
section to the toy world's concept LoRAs, checked by its detector (toyworld.py). The schema
is documented in eval/README.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from loracompose.errors import UserError, first_line
from loracompose.lora import LoraSpec, inspect_lora

from . import composlora, toyworld
from .clipscore import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ClipConvention, convention_from

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
SET_ID_PATTERN = re.compile(r"^[A-Za-z0-9_+.-]+$")
TRIGGERS_FIELD = "{triggers}"
TOP_LEVEL_KEYS = {
    "name", "model", "config", "vae", "device", "dtype", "loras", "sets", "prompt", "negative_prompt", "methods",
    "seeds", "width", "height", "steps", "guidance", "scheduler", "lora_weight", "append_triggers",
    "text_encoder_loras", "clipscore", "composlora", "toyworld", "lora_dir",
}
TESTBED_KEYS = ("composlora", "toyworld")
LEGACY_DEFAULT_SCHEDULER = "dpmsolver++"
PATH_SETTINGS = {"gates"}  # method settings that name files: relative to the suite file, like every path
PATH_LIST_SETTINGS = {"masks"}  # method settings that list files (regional's masks), the same way
DEFAULTS: dict[str, Any] = {
    "prompt": TRIGGERS_FIELD, "negative_prompt": None, "seeds": [0], "width": None, "height": None, "steps": 30,
    "guidance": None, "scheduler": None, "lora_weight": 1.0, "append_triggers": True,
    "text_encoder_loras": True, "device": "auto", "dtype": "auto", "config": None, "vae": None, "lora_dir": None,
}


@dataclass(frozen=True)
class LoraDefinition:
    """A LoRA of the suite: file, strength, trigger words, category, optional reference images."""

    name: str
    file: Path
    weight: float
    trigger_words: tuple[str, ...]
    category: str | None = None
    references: tuple[Path, ...] = ()
    lbw: str | None = None  # per-block strengths: a lora-block-weight vector or preset name ("INALL")

    def spec(self) -> LoraSpec:
        return LoraSpec(self.file, self.weight, name=self.name, trigger_words=self.trigger_words,
                        category=self.category, block_weights=self.lbw)

    def describe(self) -> dict[str, Any]:
        described = {"name": self.name, "file": self.file.name, "weight": self.weight,
                     "trigger_words": list(self.trigger_words), "category": self.category}
        return {**described, "lbw": self.lbw} if self.lbw is not None else described


@dataclass(frozen=True)
class CompositionSet:
    """LoRAs composed into one image (by name, in order), the prompt they are generated from, and
    optionally a region box (relative x0, y0, x1, y1) and region prompt per LoRA for methods that
    place concepts (LoRA-Composer)."""

    id: str
    loras: tuple[str, ...]
    prompt: str
    boxes: tuple[tuple[float, ...], ...] | None = None
    region_prompts: tuple[str, ...] | None = None

    def method_settings(self) -> dict[str, Any]:
        """The set's own settings for methods that take them (given ones only)."""
        return {key: value for key, value in (("boxes", self.boxes), ("region_prompts", self.region_prompts)) if value}


@dataclass(frozen=True)
class MethodEntry:
    """A method of the grid: its label (unique in the suite), registry name and settings."""

    label: str
    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    profile: Mapping[str, Any] = field(default_factory=dict)

    def build(self, composition_set: CompositionSet | None = None):
        """A fresh method object (methods keep per-generation state); a set's boxes and region
        prompts go to methods that take them (LoRA-Composer) unless the method's settings give their own."""
        from loracompose import METHODS
        from loracompose.methods.settings import build_method

        # The suite's ``profile: {size, steps}`` are CMLoRA's profile_size and profile_steps settings.
        profile = {f"profile_{key}": value for key, value in self.profile.items()}
        settings = {**profile, **self.settings, **(self.set_settings(composition_set) if composition_set else {})}
        return build_method(METHODS[self.name], settings, label=repr(self.label))

    def set_settings(self, composition_set: CompositionSet) -> dict[str, Any]:
        """The set's own settings (boxes, region prompts) that this method takes and does not set itself."""
        from loracompose import METHODS

        fields = getattr(METHODS[self.name], "__dataclass_fields__", {})
        return {key: value for key, value in composition_set.method_settings().items()
                if key in fields and key not in self.settings}

    def describe(self) -> dict[str, Any]:
        described = {"label": self.label, "method": self.name, **self.settings}
        return described | ({"profile": dict(self.profile)} if self.profile else {})


@dataclass(frozen=True)
class ClipSettings:
    """Which CLIP model scores the images, and under which convention."""

    model: str = DEFAULT_CLIP_MODEL
    pretrained: str = DEFAULT_CLIP_PRETRAINED
    config: str | None = None
    convention: ClipConvention = field(default_factory=ClipConvention)
    reduce: str = "mean"

    def load(self, device: str):
        from .clipscore import ClipScorer

        return ClipScorer.load(self.model, self.pretrained, config=self.config, convention=self.convention,
                               device=device)


@dataclass(frozen=True)
class Job:
    """One image of the grid."""

    method: MethodEntry
    set: CompositionSet
    seed: int
    fingerprint: str

    @property
    def id(self) -> str:
        return f"{self.set.id}--{self.method.label}--s{self.seed}--{self.fingerprint[:8]}"


@dataclass(frozen=True)
class Suite:
    """A checked benchmark suite (see load_suite)."""

    name: str
    model: str
    loras: Mapping[str, LoraDefinition]
    sets: tuple[CompositionSet, ...]
    methods: tuple[MethodEntry, ...]
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance: float | None = None  # None: the model family's own (SD1.5/SDXL 7.5, FLUX 3.5 distilled, SD3 7)
    scheduler: str | None = None  # None: the model family's own (SD1.5/SDXL DPM-Solver++, FLUX/SD3 Euler)
    append_triggers: bool = True
    text_encoder_loras: bool = True
    config: str | None = None
    vae: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    clipscore: ClipSettings | None = None
    style: str | None = None
    detector: str | None = None  # "toyworld": the runner records which concepts each image shows
    lora_dir: Path | None = None  # the folder <lora:NAME:W> tags in set prompts pick files from

    def jobs(self) -> list[Job]:
        """The grid, set-major (set, then seed, then method), so a partial run compares methods."""
        return [Job(method, composition_set, seed, self._fingerprint(method, composition_set, seed))
                for composition_set in self.sets for seed in self.seeds for method in self.methods]

    def set_loras(self, composition_set: CompositionSet) -> list[LoraDefinition]:
        return [self.loras[name] for name in composition_set.loras]

    def trigger_words(self, composition_set: CompositionSet) -> list[str]:
        return [word for lora in self.set_loras(composition_set) for word in lora.trigger_words]

    def generation_settings(self) -> dict[str, Any]:
        """Settings shared by every job (part of every job's fingerprint)."""
        settings: dict[str, Any] = {
            "model": _model_label(self.model), "vae": self.vae and _model_label(self.vae), "dtype": self.dtype,
            "negative_prompt": self.negative_prompt, "width": self.width, "height": self.height,
            "steps": self.steps, "guidance": self.guidance, "scheduler": self.scheduler,
            "append_triggers": self.append_triggers, "text_encoder_loras": self.text_encoder_loras}
        if self.lora_dir is not None:  # only then, so the ids of suites without one stay as they were
            settings["lora_dir"] = str(self.lora_dir)
        return settings

    def describe(self) -> dict[str, Any]:
        """The resolved suite, JSON-ready (written to run.json)."""
        return {
            "name": self.name, "style": self.style, "model": self.model, "config": self.config, "vae": self.vae,
            **{key: value for key, value in self.generation_settings().items() if key not in ("model", "vae")},
            "seeds": list(self.seeds), "methods": [method.describe() for method in self.methods],
            "loras": {name: lora.describe() | {"file": str(lora.file), "references": [str(p) for p in lora.references]}
                      for name, lora in self.loras.items()},
            "sets": [{"id": s.id, "loras": list(s.loras), "prompt": s.prompt} | _set_extras(s) for s in self.sets],
            "detector": self.detector,
            "clipscore": None if self.clipscore is None else {
                "model": self.clipscore.model, "pretrained": self.clipscore.pretrained, "config": self.clipscore.config,
                "convention": self.clipscore.convention.to_dict(), "reduce": self.clipscore.reduce},
        }

    def _fingerprint(self, method: MethodEntry, composition_set: CompositionSet, seed: int) -> str:
        # A suite without a scheduler hashes as DPM-Solver++, the default before DiTs, so its job ids stay the same.
        # A suite without guidance hashes as null, not as SD's 7.5: on FLUX the family's 3.5 and an explicit
        # 7.5 make different images, so they must not share ids (SD suites without guidance got new ids).
        generation = self.generation_settings() | {"scheduler": self.scheduler or LEGACY_DEFAULT_SCHEDULER}
        payload = {**generation, "method": method.describe() | {"label": None}, "seed": seed,
                   "prompt": composition_set.prompt,
                   "loras": [lora.describe() for lora in self.set_loras(composition_set)]}
        payload |= _json_ready(method.set_settings(composition_set))  # only what this method uses
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _set_extras(composition_set: CompositionSet) -> dict[str, Any]:
    """A set's own method settings, JSON-ready (absent when it gives none)."""
    return _json_ready(composition_set.method_settings())


def _json_ready(extras: dict[str, Any]) -> dict[str, Any]:
    extras = dict(extras)
    if "boxes" in extras:
        extras["boxes"] = [list(box) for box in extras["boxes"]]
    if "region_prompts" in extras:
        extras["region_prompts"] = list(extras["region_prompts"])
    return extras


# ------------------------------------------------------------------------------------ loading


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite YAML file."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise UserError(f"suite file {path} not found; give a suite .yaml file (see eval/README.md)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = first_line(error)
        raise UserError(f"suite file {path} is not valid YAML ({first}); fix the file") from None
    return parse_suite(data, base_dir=path.parent, default_name=path.stem)


def parse_suite(data: Any, *, base_dir: Path = Path("."), default_name: str = "suite") -> Suite:
    """A Suite from the parsed YAML mapping; relative paths resolve against ``base_dir``."""
    if not isinstance(data, Mapping):
        raise UserError("suite: the file must hold a mapping (model:, loras:, sets:, methods:, ...)")
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise UserError(f"suite key {unknown[0]!r} is not known; use {', '.join(sorted(TOP_LEVEL_KEYS))}")
    testbed_settings, testbed_loras = _testbed_section(data, base_dir)
    data = {**DEFAULTS, **testbed_settings, **{k: v for k, v in data.items() if k not in TESTBED_KEYS}}
    if "model" not in data:
        raise UserError("suite: 'model' is missing; give a hub id, a diffusers folder or a .safetensors checkpoint")
    loras = testbed_loras or _parse_loras(data.get("loras"), base_dir, data["lora_weight"])
    suite = Suite(
        name=str(data.get("name") or default_name),
        model=_local_or_id(data["model"], base_dir, "model"),
        config=_optional_local(data["config"], base_dir, "config"),
        vae=_optional_local(data["vae"], base_dir, "vae"),
        loras=loras,
        sets=_parse_sets(data.get("sets"), loras, str(data["prompt"])),
        methods=_parse_methods(data.get("methods"), base_dir),
        seeds=_parse_seeds(data["seeds"]),
        negative_prompt=None if data["negative_prompt"] is None else str(data["negative_prompt"]),
        width=_size(data["width"], "width"), height=_size(data["height"], "height"),
        steps=_positive_int(data["steps"], "steps"), guidance=_guidance(data["guidance"]),
        scheduler=_scheduler(data["scheduler"]),
        append_triggers=_flag(data["append_triggers"], "append_triggers"),
        text_encoder_loras=_flag(data["text_encoder_loras"], "text_encoder_loras"),
        device=str(data["device"]), dtype=str(data["dtype"]),
        clipscore=_parse_clipscore(data.get("clipscore"), base_dir),
        style=data.get("style"),
        detector=data.get("detector"),
        lora_dir=None if data["lora_dir"] is None else _resolve(data["lora_dir"], base_dir),
    )
    _check_set_settings(suite)
    _check_prompt_tags(suite)
    return suite


def _check_prompt_tags(suite: Suite) -> None:
    """Resolve each set prompt's ``<lora:NAME:W>`` tags now (the runner passes ``lora_dir`` to generate):
    a missing file or folder fails before any image is made."""
    from loracompose.formats.prompt_tags import has_lora_tags, split_lora_tags

    for composition_set in suite.sets:
        if has_lora_tags(composition_set.prompt):
            try:
                split_lora_tags(composition_set.prompt, suite.lora_dir)
            except UserError as error:
                raise UserError(f"suite set {composition_set.id!r}: {error} (suite key lora_dir)") from None


def _check_set_settings(suite: Suite) -> None:
    """Build each method that takes a set's boxes or region prompts with them: bad ones fail now."""
    for method in suite.methods:
        for composition_set in suite.sets:
            if method.set_settings(composition_set):
                try:
                    method.build(composition_set)
                except UserError as error:
                    raise UserError(f"suite set {composition_set.id!r} with method {method.label!r}: {error}") from None


def _testbed_section(data: Mapping[str, Any], base_dir: Path) -> tuple[dict[str, Any], dict[str, LoraDefinition]]:
    """What a testbed section (``composlora:`` or ``toyworld:``) stands for: suite keys (reference
    settings, sets with their prompts, negative prompt) and the LoRA definitions. Empty without one."""
    if "composlora" in data and "toyworld" in data:
        raise UserError("suite: give one testbed, composlora: or toyworld:, not both")
    if "toyworld" in data:
        settings, entries = toyworld.testbed(data["toyworld"], data, lambda value: _resolve(value, base_dir))
        return settings, _parse_loras(entries, base_dir, settings["lora_weight"])
    section = data.get("composlora")
    if section is None:
        return {}, {}
    if not isinstance(section, Mapping) or "lora_dir" not in section:
        raise UserError("suite composlora: give a mapping with style (anime|reality) and lora_dir "
                        "(the unpacked ComposLoRA LoRAs)")
    if "loras" in data or "sets" in data:
        raise UserError("suite: give either composlora: or loras:/sets:, not both")
    unknown = sorted(set(section) - {"style", "lora_dir", "info", "sizes"})
    if unknown:
        raise UserError(f"suite composlora key {unknown[0]!r} is not known; use style, lora_dir, info, sizes")
    style = composlora.check_style(str(section.get("style", "anime")))
    info = section.get("info")
    testbed = composlora.read_lora_info(_resolve(info, base_dir)) if info else composlora.builtin_lora_info(style)
    lora_dir = _resolve(section["lora_dir"], base_dir)
    weight = _number(data.get("lora_weight", composlora.REFERENCE_SETTINGS[style]["lora_weight"]), "lora_weight")
    loras = {lora.id: LoraDefinition(lora.id, composlora.lora_file(lora_dir, style, lora.id), weight,
                                     lora.trigger_words, lora.category) for lora in testbed}
    sizes = section.get("sizes", composlora.set_sizes(testbed))
    sets = [{"id": testbed_set.id, "loras": [lora.id for lora in testbed_set.loras],
             "prompt": composlora.prompt_for(style, testbed_set)}
            for size in _int_list(sizes, "composlora sizes")
            for testbed_set in composlora.composition_sets(testbed, size)]
    settings = {**composlora.REFERENCE_SETTINGS[style], "sets": sets, "style": style,
                "negative_prompt": composlora.NEGATIVE_PROMPT[style], "name": f"composlora-{style}"}
    return settings, loras


def _parse_loras(entries: Any, base_dir: Path, default_weight: Any) -> dict[str, LoraDefinition]:
    if not isinstance(entries, Mapping) or not entries:
        raise UserError("suite: 'loras' must map names to {file: ..., triggers: ..., category: ...}")
    return {str(name): _parse_lora(str(name), entry, base_dir, default_weight) for name, entry in entries.items()}


def _parse_lora(name: str, entry: Any, base_dir: Path, default_weight: Any) -> LoraDefinition:
    if not NAME_PATTERN.match(name):
        raise UserError(f"suite LoRA name {name!r}: use letters, digits, '_' and '-' only "
                        "(it becomes the adapter name)")
    if isinstance(entry, str):
        entry = {"file": entry}
    if not isinstance(entry, Mapping) or "file" not in entry:
        raise UserError(f"suite LoRA {name!r}: give at least file: PATH.safetensors")
    unknown = sorted(set(entry) - {"file", "weight", "triggers", "category", "references", "lbw"})
    if unknown:
        raise UserError(f"suite LoRA {name!r}: key {unknown[0]!r} is not known; use file, weight, triggers, "
                        "category, references, lbw")
    file = _resolve(entry["file"], base_dir)
    triggers, category = _triggers(entry.get("triggers"), name), entry.get("category")
    if triggers is None or (category is None and file.is_file()):  # from the file's metadata, as `generate` does
        found = inspect_lora(LoraSpec(file, name=name))
        triggers = found.trigger_words if triggers is None else triggers
        category = found.category if category is None else str(category)
    return LoraDefinition(name, file, _number(entry.get("weight", default_weight), f"LoRA {name!r} weight"),
                          triggers, category, _references(entry.get("references"), base_dir, name),
                          _lbw(entry.get("lbw"), name))


def _lbw(value: Any, name: str) -> str | None:
    """A LoRA's ``lbw:`` (preset name, comma-separated string or list of numbers), checked now."""
    if value is None:
        return None
    text = ",".join(str(number) for number in value) if isinstance(value, list) else str(value)
    from loracompose.formats.block_weights import lbw_block_weights

    lbw_block_weights(text, f"suite LoRA {name!r}")  # a bad vector fails when the suite is read
    return text


def _triggers(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    words = value.split(",") if isinstance(value, str) else value
    if not isinstance(words, list):
        raise UserError(f"suite LoRA {name!r}: triggers must be a list or a comma-separated string")
    return tuple(str(word).strip() for word in words if str(word).strip())


def _references(value: Any, base_dir: Path, name: str) -> tuple[Path, ...]:
    """Reference images: a list of files, or one folder (its .png/.jpg/.jpeg/.webp files)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise UserError(f"suite LoRA {name!r}: references must be a folder or a list of image files")
    paths = []
    for item in items:
        path = _resolve(item, base_dir)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")))
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"suite LoRA {name!r}: reference {path} not found; give image files or a folder of them")
    if not paths:
        raise UserError(f"suite LoRA {name!r}: the references hold no .png/.jpg/.webp images")
    return tuple(paths)


def _parse_sets(entries: Any, loras: Mapping[str, LoraDefinition], template: str) -> tuple[CompositionSet, ...]:
    if not isinstance(entries, list) or not entries:
        raise UserError("suite: 'sets' must list composition sets, e.g. - [girl, park]")
    sets = tuple(_parse_set(entry, loras, template) for entry in entries)
    ids = [s.id for s in sets]
    duplicate = next((set_id for set_id in ids if ids.count(set_id) > 1), None)
    if duplicate:
        raise UserError(f"suite set id {duplicate!r} appears twice; give each set a distinct id")
    return sets


def _parse_set(entry: Any, loras: Mapping[str, LoraDefinition], template: str) -> CompositionSet:
    if isinstance(entry, list):
        entry = {"loras": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("loras"), list) or not entry["loras"]:
        raise UserError(f"suite set {entry!r}: give a list of LoRA names or {{id:, loras: [...], prompt:}}")
    names = tuple(str(name) for name in entry["loras"])
    for name in names:
        if name not in loras:
            raise UserError(f"suite set {list(names)}: LoRA {name!r} is not defined under loras:; "
                            "add it or fix the name")
    if len(set(names)) != len(names):
        raise UserError(f"suite set {list(names)}: a LoRA appears twice; list each once")
    set_id = str(entry.get("id") or "+".join(names))
    if not SET_ID_PATTERN.match(set_id):
        raise UserError(f"suite set id {set_id!r}: use letters, digits and _ + . - only (it names files)")
    triggers = ", ".join(word for name in names for word in loras[name].trigger_words)
    prompt = str(entry.get("prompt", template)).replace(TRIGGERS_FIELD, triggers)
    return CompositionSet(set_id, names, prompt, _boxes(entry.get("boxes"), names),
                          _region_prompts(entry.get("region_prompts"), names))


def _region_prompts(value: Any, names: Sequence[str]) -> tuple[str, ...] | None:
    """A set's region prompts: one text per LoRA ("" for its trigger words), or none."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != len(names) or not all(isinstance(text, str) for text in value):
        raise UserError(f"suite set {list(names)}: region_prompts must list one text per LoRA ('' = its trigger words)")
    return tuple(value)


def _boxes(value: Any, names: Sequence[str]) -> tuple[tuple[float, ...], ...] | None:
    """A set's region boxes: one [x0, y0, x1, y1] (relative 0..1) per LoRA, or none."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != len(names) or not all(
            isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box) for box in value):
        raise UserError(f"suite set {list(names)}: boxes must list one [x0, y0, x1, y1] (relative 0..1) per LoRA")
    return tuple(tuple(float(v) for v in box) for box in value)


def _parse_methods(entries: Any, base_dir: Path = Path(".")) -> tuple[MethodEntry, ...]:
    if not isinstance(entries, list) or not entries:
        raise UserError("suite: 'methods' must list methods, e.g. [merge, {method: switch, period: 5}]")
    methods = tuple(_parse_method(entry, base_dir) for entry in entries)
    labels = [method.label for method in methods]
    duplicate = next((label for label in labels if labels.count(label) > 1), None)
    if duplicate:
        raise UserError(f"suite method label {duplicate!r} appears twice; give one of them label: NAME")
    return methods


def _parse_method(entry: Any, base_dir: Path = Path(".")) -> MethodEntry:
    from loracompose import METHODS

    settings = {"method": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, Mapping) else None
    if settings is None or "method" not in settings:
        raise UserError(f"suite method {entry!r}: give a name or {{method: NAME, label: ..., SETTING: VALUE}}")
    for key in PATH_SETTINGS.intersection(settings):
        if settings[key] is not None:
            settings[key] = str(_resolve(settings[key], base_dir))
    for key in PATH_LIST_SETTINGS.intersection(settings):
        if isinstance(settings[key], list):
            settings[key] = [str(_resolve(item, base_dir)) for item in settings[key]]
    name = str(settings.pop("method"))
    if name not in METHODS:
        raise UserError(f"suite method {name!r} is not known; use one of {', '.join(sorted(METHODS))}")
    label = str(settings.pop("label", name))
    if not NAME_PATTERN.match(label):
        raise UserError(f"suite method label {label!r}: use letters, digits, '_' and '-' only (it names files)")
    profile = settings.pop("profile", {}) or {}
    method = MethodEntry(label, name, settings, _profile(profile, label))
    method.build()  # unknown or bad settings fail now, not mid-run
    return method


def _profile(profile: Any, label: str) -> dict[str, Any]:
    from loracompose.frequency import ProfileSettings

    if not isinstance(profile, Mapping):
        raise UserError(f"suite method {label!r}: profile must be a mapping such as {{size: 512, steps: 20}}")
    try:
        ProfileSettings(**profile).check()
    except TypeError as error:
        raise UserError(f"suite method {label!r} profile: {error}") from None
    return dict(profile)


def _parse_clipscore(section: Any, base_dir: Path) -> ClipSettings | None:
    if section is None or section is False:
        return None
    section = {} if section is True else section
    if not isinstance(section, Mapping):
        raise UserError("suite clipscore: give a mapping with model, pretrained, config, convention "
                        "(or true for the defaults)")
    unknown = sorted(set(section) - {"model", "pretrained", "config", "convention", "reduce"})
    if unknown:
        raise UserError(f"suite clipscore key {unknown[0]!r} is not known; use model, pretrained, config, "
                        "convention, reduce")
    pretrained = str(section.get("pretrained", DEFAULT_CLIP_PRETRAINED))
    local = _resolve(pretrained, base_dir)
    reduce = str(section.get("reduce", "mean"))
    if reduce not in ("mean", "max"):
        raise UserError(f"suite clipscore reduce {reduce!r}: use mean or max (over a concept's reference images)")
    return ClipSettings(
        model=str(section.get("model", DEFAULT_CLIP_MODEL)),
        pretrained=str(local) if local.exists() else pretrained,
        config=_optional_local(section.get("config"), base_dir, "clipscore config"),
        convention=convention_from(section.get("convention")),
        reduce=reduce,
    )


# ------------------------------------------------------------------------------------ values


def _resolve(value: Any, base_dir: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base_dir / path


def _local_or_id(value: Any, base_dir: Path, label: str) -> str:
    """A local path (resolved against the suite's folder) if it exists there, else the text (hub id)."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise UserError(f"suite {label}: give a hub id or a local path")
    local = _resolve(value, base_dir)
    return str(local) if local.exists() else str(value)


def _optional_local(value: Any, base_dir: Path, label: str) -> str | None:
    return None if value is None else _local_or_id(value, base_dir, label)


def _model_label(model: str) -> str:
    """What identifies a model in a fingerprint: the hub id, or a local path's last component."""
    return Path(model).name if Path(model).exists() else model


def _parse_seeds(value: Any) -> tuple[int, ...]:
    seeds = _int_list(value, "seeds")
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"suite seeds {seeds}: use distinct non-negative integers")
    return tuple(seeds)


def _int_list(value: Any, label: str) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        raise UserError(f"suite {label} {value!r}: give an integer or a list of integers")
    return list(items)


def _positive_int(value: Any, label: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"suite {label} {value!r}: give a positive integer")
    return value


def _size(value: Any, label: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
        raise UserError(f"suite {label} {value!r}: give a positive multiple of 8 pixels")
    return value


def _number(value: Any, label: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError(f"suite {label} {value!r}: give a number")
    return float(value)


def _guidance(value: Any) -> float | None:
    """The suite's guidance scale, or None (left out or null): the loaded model family's own."""
    if value is None:
        return None
    guidance = _number(value, "guidance")
    if guidance < 0:
        raise UserError(f"suite guidance {guidance}: the CFG scale cannot be negative")
    return guidance


def _scheduler(value: Any) -> str | None:
    from loracompose.pipelines.schedulers import SCHEDULERS

    if value is None:  # the model family's own default
        return None
    if value not in SCHEDULERS:
        raise UserError(f"suite scheduler {value!r} is not known; use one of {', '.join(SCHEDULERS)}")
    return str(value)


def _flag(value: Any, label: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"suite {label} {value!r}: give true or false")
    return value


def select_jobs(jobs: Sequence[Job], only: Mapping[str, Sequence[str]] | None = None,
                limit: int | None = None) -> list[Job]:
    """Jobs matching every ``only`` key (method, set, seed, n; any of its values), then the first ``limit``."""
    only = dict(only or {})
    unknown = sorted(set(only) - set(FILTER_KEYS))
    if unknown:
        raise UserError(f"--only {unknown[0]}=...: filter on one of {', '.join(FILTER_KEYS)}")
    selected = [job for job in jobs if all(job_value(job, key) in values for key, values in only.items())]
    return selected if limit is None else selected[:limit]


FILTER_KEYS = ("method", "set", "seed", "n")


def job_value(job: Job, key: str) -> str:
    """The job's method label, set id, seed or set size, as text (what --only matches)."""
    return {"method": job.method.label, "set": job.set.id, "seed": str(job.seed), "n": str(len(job.set.loras))}[key]
