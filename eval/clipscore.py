"""CLIPScore on open_clip under an explicit convention, and per-concept image similarity.

    text    <- prefix + (the set's trigger words joined with ", "  |  the full prompt)
    cos_i   <- < E_img(image_i) / |E_img(image_i)| , E_txt(text_i) / |E_txt(text_i)| >
    score_i <- scale * max(cos_i, 0)   if clamp == "per-sample"      else  scale * cos_i
    mean    <- max(mean_i score_i, 0)  if clamp == "mean"            else  mean_i score_i

Several incompatible conventions are in use (docs/evaluation.md); numbers compare only within one,
so the convention and the weights' origin are written into every result. The defaults are
ComposLoRA's (MLC / CMLoRA): ViT-B/16 with OpenAI weights (open_clip ``ViT-B-16-quickgelu`` with
``pretrained="openai"``), trigger words only, joined with ", ", no prefix, 100 * max(cos, 0) per
image. MLC rounds each score to 4 decimals; we keep full precision and round for display.

Offline, ``pretrained`` is a local ``.safetensors`` file (or a folder holding
``open_clip_model.safetensors``), e.g. the file of the hub repo ``timm/vit_base_patch16_clip_224.openai``;
nothing is downloaded then. Pickled checkpoints are refused.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from loracompose.errors import UserError, first_line

ImageLike = Image.Image | str | Path

DEFAULT_CLIP_MODEL = "ViT-B-16-quickgelu"
DEFAULT_CLIP_PRETRAINED = "openai"
CLAMPS = ("per-sample", "mean", "none")
TEXT_SOURCES = ("triggers", "prompt")
SAFE_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors")
BATCH_SIZE = 32


@dataclass(frozen=True)
class ClipConvention:
    """How a cosine becomes a CLIPScore, and which text is scored.

    Attributes:
        scale: 100 (torchmetrics, ComposLoRA), 2.5 (Hessel et al. CLIP-S) or 1 (raw cosine).
        clamp: "per-sample" (max(cos, 0) per image), "mean" (torchmetrics: the mean is clamped,
            each sample is not) or "none".
        prefix: text put before the scored text ("A photo depicts " for CLIP-S).
        text_source: "triggers" (the set's trigger words only) or "prompt" (the full prompt).
        trigger_separator: how trigger words are joined.
    """

    scale: float = 100.0
    clamp: str = "per-sample"
    prefix: str = ""
    text_source: str = "triggers"
    trigger_separator: str = ", "

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise UserError(f"clipscore scale {self.scale!r}: use a positive number (100, 2.5 or 1)")
        if self.clamp not in CLAMPS:
            raise UserError(f"clipscore clamp {self.clamp!r}: use one of {', '.join(CLAMPS)}")
        if self.text_source not in TEXT_SOURCES:
            raise UserError(f"clipscore text {self.text_source!r}: use 'triggers' or 'prompt'")

    def text(self, prompt: str, trigger_words: Sequence[str]) -> str:
        """The text scored against an image generated from ``prompt`` with these trigger words."""
        body = self.trigger_separator.join(trigger_words) if self.text_source == "triggers" else prompt
        return self.prefix + body

    def sample_scores(self, cosines: Sequence[float]) -> list[float]:
        """Per-image scores (clamped only under the per-sample convention)."""
        floor = 0.0 if self.clamp == "per-sample" else -math.inf
        return [self.scale * max(float(cos), floor) for cos in cosines]

    def aggregate(self, scores: Sequence[float]) -> float:
        """The mean of per-image scores under this convention (NaN for none)."""
        if not scores:
            return math.nan
        mean = math.fsum(scores) / len(scores)
        return max(mean, 0.0) if self.clamp == "mean" else mean

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONVENTIONS: dict[str, ClipConvention] = {
    "composlora": ClipConvention(),
    "torchmetrics": ClipConvention(clamp="mean", text_source="prompt"),
    "clip-s": ClipConvention(scale=2.5, prefix="A photo depicts ", text_source="prompt"),
    "raw": ClipConvention(scale=1.0, clamp="none", text_source="prompt"),
}


def convention_from(value: str | Mapping[str, Any] | ClipConvention | None) -> ClipConvention:
    """A convention from a preset name, a mapping of its fields (``text`` = ``text_source``) or None."""
    if value is None:
        return ClipConvention()
    if isinstance(value, ClipConvention):
        return value
    if isinstance(value, str):
        if value not in CONVENTIONS:
            raise UserError(f"clipscore convention {value!r} is not known; "
                            f"use one of {', '.join(CONVENTIONS)} or a mapping")
        return CONVENTIONS[value]
    if not isinstance(value, Mapping):
        raise UserError(f"clipscore convention {value!r}: give a preset name or a mapping of scale/clamp/prefix/text")
    settings = dict(value)
    if "text" in settings:
        settings["text_source"] = settings.pop("text")
    known = {f.name for f in fields(ClipConvention)}
    unknown = sorted(set(settings) - known)
    if unknown:
        accepted = ", ".join([*sorted(known - {"text_source"}), "text"])
        raise UserError(f"clipscore convention key {unknown[0]!r} is not known; use {accepted}")
    return ClipConvention(**settings)


@dataclass(frozen=True)
class ClipScores:
    """Scores of a batch: per image, their mean under the convention, and the raw cosines."""

    per_sample: list[float]
    mean: float
    cosines: list[float]
    texts: list[str]


class ClipScorer:
    """An open_clip model with its preprocessing, tokenizer and a CLIPScore convention."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, convention: ClipConvention,
                 origin: Mapping[str, Any], device: torch.device):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.convention = convention
        self.origin = dict(origin)
        self.device = device
        self._reference_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_CLIP_MODEL,
        pretrained: str | Path = DEFAULT_CLIP_PRETRAINED,
        *,
        config: str | Path | None = None,
        convention: str | Mapping[str, Any] | ClipConvention | None = None,
        device: str | torch.device = "auto",
    ) -> ClipScorer:
        """Load an open_clip model by name with a pretrained tag or a local safetensors file.

        Args:
            model: open_clip architecture name, e.g. ``ViT-B-16-quickgelu`` (OpenAI weights need
                the QuickGELU variant).
            pretrained: a tag (``openai``, ``laion2b_s34b_b79k``; downloaded through open_clip) or
                a local ``.safetensors`` file / folder holding one (nothing is downloaded).
            config: an open_clip model config JSON to register first (its file stem is the name),
                for architectures open_clip does not ship (tests use a tiny one).
            convention: preset name (``composlora``, ``torchmetrics``, ``clip-s``, ``raw``),
                a mapping of :class:`ClipConvention` fields, or a ClipConvention.
            device: "auto" (CUDA if present), "cpu", "cuda:1", ...
        """
        import open_clip

        weights, origin = resolve_clip(model, pretrained, config=config)
        torch_device = _resolve_device(device)
        clip_model, preprocess = _create_model(model, weights)
        tokenizer = open_clip.get_tokenizer(model)
        return cls(clip_model, preprocess, tokenizer, convention_from(convention), origin, torch_device)

    def describe(self) -> dict[str, Any]:
        """Model, weights' origin and convention, as written into results."""
        return {**self.origin, "convention": self.convention.to_dict()}

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """L2-normalised image embeddings, one row per image."""
        rows = []
        for start in range(0, len(images), BATCH_SIZE):
            batch = torch.stack([self.preprocess(_as_rgb(image)) for image in images[start:start + BATCH_SIZE]])
            rows.append(self.model.encode_image(batch.to(self.device)).float())
        return _normalised(torch.cat(rows))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, one row per text (long texts are truncated)."""
        rows = [self.model.encode_text(self.tokenizer(list(texts[start:start + BATCH_SIZE])).to(self.device)).float()
                for start in range(0, len(texts), BATCH_SIZE)]
        return _normalised(torch.cat(rows))

    def cosines(self, images: Sequence[ImageLike], texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each image with the text at the same position."""
        if len(images) != len(texts) or not images:
            raise UserError(f"clipscore: got {len(images)} images and {len(texts)} texts; give one text per image")
        similarity = (self.image_embeddings(images) * self.text_embeddings(texts)).sum(dim=-1)
        return similarity.cpu().tolist()

    def score(self, images: Sequence[ImageLike], texts: Sequence[str]) -> ClipScores:
        """CLIPScore of each image against the text at the same position (texts used as given)."""
        cosines = self.cosines(images, texts)
        per_sample = self.convention.sample_scores(cosines)
        return ClipScores(per_sample, self.convention.aggregate(per_sample), cosines, list(texts))

    def score_generation(self, images: Sequence[ImageLike], prompt: str, trigger_words: Sequence[str]) -> ClipScores:
        """CLIPScore of images generated from ``prompt`` with a set's trigger words, text per the convention."""
        text = self.convention.text(prompt, trigger_words)
        return self.score(images, [text] * len(images))

    def concept_similarity(self, image: ImageLike, references: Mapping[str, Sequence[ImageLike]],
                           reduce: str = "mean") -> dict[str, float]:
        """Raw cosine between the image's CLIP embedding and each concept's reference images,
        averaged (``reduce="mean"``) or the best match (``"max"``) per concept."""
        if reduce not in ("mean", "max"):
            raise UserError(f"concept similarity reduce {reduce!r}: use 'mean' or 'max'")
        embedding = self.image_embeddings([image])[0]
        scores = {}
        for concept, images in references.items():
            similarity = self._reference_embeddings(images) @ embedding
            scores[concept] = float(similarity.mean() if reduce == "mean" else similarity.max())
        return scores

    def _reference_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        if not images:
            raise UserError("concept similarity: a concept has no reference images; list at least one")
        key = tuple(str(image) if isinstance(image, (str, Path)) else f"id:{id(image)}" for image in images)
        if key not in self._reference_cache:
            self._reference_cache[key] = self.image_embeddings(list(images))
        return self._reference_cache[key]


# ------------------------------------------------------------------------------------ loading


def resolve_clip(model: str, pretrained: str | Path, *, config: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """(what to pass to open_clip, the origin written into results) without loading the model:
    backend, model name, weights (tag, or file + sha256)."""
    import open_clip

    if config is not None:
        register_model_config(config)
    _check_model_name(model)
    weights, origin = _resolve_weights(model, pretrained)
    return weights, {"backend": f"open_clip {open_clip.__version__}", "model": model, **origin}


def same_setup(clip: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether two results' ``clip`` descriptions compare: same model, same weights (sha256 of a
    file, else the tag) and same convention."""
    def key(described: Mapping[str, Any]) -> tuple[Any, ...]:
        weights = described.get("weights_sha256") or described.get("weights")
        return described.get("model"), weights, described.get("convention")

    return key(clip) == key(other)


def register_model_config(config: str | Path) -> str:
    """Register an open_clip model config JSON (name = its file stem); returns the name."""
    import open_clip

    path = Path(config).expanduser()
    if not path.is_file() or path.suffix != ".json":
        raise UserError(f"clip config {path}: not found or not a .json file; give an open_clip model config JSON")
    open_clip.add_model_config(path)
    return path.stem


def _check_model_name(model: str) -> None:
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")) or model in open_clip.list_models():
        return
    raise UserError(f"clip model {model!r} is not an open_clip architecture; see open_clip.list_models(), "
                    f"e.g. {DEFAULT_CLIP_MODEL}")


def _resolve_weights(model: str, pretrained: str | Path) -> tuple[str, dict[str, Any]]:
    """(what to pass to open_clip, the weights' origin) for a tag, a file or a folder."""
    import open_clip

    text = str(pretrained)
    if model.startswith(("hf-hub:", "local-dir:")):
        return "", {"weights": model}
    if not isinstance(pretrained, Path) and text in open_clip.list_pretrained_tags_by_model(model):
        if text == "openai" and "quickgelu" not in model.lower():
            raise UserError(f"clip model {model!r} with OpenAI weights computes with the wrong activation; "
                            f"use {model}-quickgelu")
        return text, {"weights": f"tag:{text}"}
    path = Path(text).expanduser()
    if path.is_dir():
        path = _weights_in_folder(path)
    if not path.is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UserError(f"clip weights {text!r}: not a file and not a pretrained tag of {model} ({tags}); "
                        "give a .safetensors file or a tag")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"clip weights {path} are not a .safetensors file; pickled checkpoints are refused "
                        "(they can run code): convert it to safetensors first")
    return str(path), {"weights": str(path), "weights_sha256": _sha256(path)}


def _weights_in_folder(folder: Path) -> Path:
    for name in SAFE_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"clip weights folder {folder} holds none of {', '.join(SAFE_WEIGHT_NAMES)}; "
                    "give the .safetensors file itself")


def _create_model(model: str, weights: str) -> tuple[torch.nn.Module, Any]:
    import open_clip

    create_parameters = inspect.signature(open_clip.create_model_and_transforms).parameters
    safe = {"weights_only": True} if "weights_only" in create_parameters else {}
    try:
        clip_model, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights or None, **safe)
    except (RuntimeError, AssertionError, KeyError, ValueError) as error:  # mismatched or unreachable weights
        first = first_line(error)
        hint = "download the weights first and pass the .safetensors file" if "download" in first.lower() else \
            "check that the weights belong to this architecture"
        raise UserError(f"clip model {model} with weights {weights or model!r} could not be loaded ({first}); "
                        f"{hint}") from None
    return clip_model, preprocess


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"clip device {device!r} is not a torch device; use auto, cpu or cuda[:N]") from None


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise UserError(f"image {path} could not be read ({error}); give a PNG or JPEG file") from None


def _normalised(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings / embeddings.norm(p=2, dim=-1, keepdim=True)
