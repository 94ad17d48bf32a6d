"""LoRA retrieval from a library (AutoLoRA, methods.md §10.1), in two tiers.

Tier 1, training-free::

    e_p <- pooled text embedding of the prompt            (the base model's text encoder(s), EOS state)
    e_i <- pooled text embedding of LoRA i's metadata text (name, triggers, category, description, tags)
    score_i <- cos(e_p, e_i) + TRIGGER_BOOST·[a trigger word of LoRA i is in the prompt]
    walk the LoRAs by score, keep at most one character, one style and one background
    (unless limits say otherwise; trigger matches are always kept: the prompt asks for them), stop at k

Tier 2, the weight-encoding retriever (scores from LoRA weights instead of metadata text)::

    for each adapted UNet layer l of a LoRA (A_l, B_l, scale s_l = alpha/r):
        t_l <- P_kind(l)(LN(s_l · q_l·A_lᵀ·B_lᵀ)) + pos_l      # q_l: learned probe (1 x d_in); P: d_out -> width
    z <- mean over l of LN(Transformer([t_1 .. t_L]))        # no causal mask: the layers are a set
    e_lora <- W_out·z                                         # into the text embedding's space
    train: symmetric InfoNCE between e_lora and the frozen text embeddings of each LoRA's captions
           (one caption sampled per LoRA per step), cosine logits / temperature
    rank: cosine(e_prompt, e_lora), plus the trigger boost and category limits of tier 1

Departures from the released code (its pitfalls, §10.4): ranking is by cosine (the reference divides
by a global norm, which ranks by dot product); no causal mask; the temperature is a setting (0.07, as
CLIP's initial value) rather than a fixed 1 with the loss multiplied by 10; each token is layer-normed
before its projection because LoRA deltas differ by orders of magnitude between files; an output
projection maps the pooled embedding to the text embedding's width (the reference's widths coincide).
Only UNet LoRA layers are encoded (text-encoder layers are ignored); ranks are zero-padded per layer.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from loracompose.errors import UserError
from loracompose.library import LibraryEntry, LibraryIndex, entry_from_lora, open_library
from loracompose.lora import LoraSpec, inspect_lora
from loracompose.outputs import atomic_write
from loracompose.training.trainer import (
    check_work_dir,
    checkpoint_dirs,
    checkpoint_folder,
    derived_seed,
    generator,
    load_checkpoint,
    save_checkpoint,
    seeded_global_rng,
)

TRIGGER_BOOST = 2.0  # > the whole cosine range [-1, 1]: an exact trigger match always ranks above the rest
DEFAULT_CATEGORY_LIMITS: dict[str, int] = {"character": 1, "style": 1, "background": 1}
RETRIEVER_FORMAT = "loracompose.autolora-retriever/1"
RETRIEVER_CONFIG_KEY = "loracompose.retriever_config"


# ------------------------------------------------------------------------------------ text embeddings


class TextEmbedder(Protocol):
    """Pooled text embeddings: ``embed(texts)`` -> (len(texts), dim) float32 on the CPU."""

    fingerprint: str

    def embed(self, texts: Sequence[str]) -> torch.Tensor: ...


class PipelineTextEmbedder:
    """The pipeline's own text encoder(s): the final EOS state (CLIPTextModel's ``pooler_output``; SDXL's
    second encoder: its projected ``text_embeds``), each L2-normalised, concatenated for SDXL."""

    def __init__(self, pipe: Any, batch_size: int = 64) -> None:
        encoders = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None),
                                                          getattr(pipe, "text_encoder_2", None))]
        self.parts = [(tokenizer, encoder) for tokenizer, encoder in encoders if encoder is not None]
        if not self.parts:
            raise UserError("the model has no text encoder to embed prompts with; use an SD1.5 or SDXL model")
        self.batch_size = batch_size
        source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
        self.fingerprint = f"pipeline-eos:{source}"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        chunks = [self._embed_batch(list(texts[i:i + self.batch_size])) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)

    @property
    def dim(self) -> int:
        return sum(int(getattr(encoder.config, "projection_dim", 0) if hasattr(encoder, "text_projection")
                       else encoder.config.hidden_size) for _, encoder in self.parts)

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        pooled = []
        with torch.no_grad():
            for tokenizer, encoder in self.parts:
                tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt")
                output = encoder(tokens.input_ids.to(encoder.device))
                vector = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output
                pooled.append(F.normalize(vector.float().cpu(), dim=-1))
        return torch.cat(pooled, dim=-1)


class OpenClipTextEmbedder:
    """open_clip's text tower: its pooled, projected ``encode_text``.

    ``pretrained`` is a tag (needs the hub, platform.md §1) or a local weights file; offline, use a
    file or a ``local-dir:`` model name.
    """

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> None:
        import open_clip

        try:
            self.model = open_clip.create_model(model_name, pretrained=pretrained, device=device).eval()
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, ValueError, OSError) as error:
            raise UserError(f"open_clip model {model_name!r} ({pretrained or 'random weights'}) cannot be loaded "
                            f"({_first_line(error)}); give a known model name and a local weights file") from None
        self.device = torch.device(device)
        self.fingerprint = f"open_clip:{model_name}:{pretrained or 'random'}"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()


# ------------------------------------------------------------------------------------ ranking (both tiers)


@dataclass(frozen=True)
class RankedLora:
    """One retrieved LoRA: its entry, its final score and the parts of it."""

    entry: LibraryEntry
    score: float
    similarity: float
    trigger_match: bool

    def to_json(self) -> dict[str, Any]:
        return {"file": self.entry.file, "name": self.entry.name, "category": self.entry.category,
                "score": self.score, "similarity": self.similarity, "trigger_match": self.trigger_match}


def trigger_in_prompt(prompt: str, trigger_words: Sequence[str]) -> bool:
    """Whether one of the trigger words appears in the prompt as a whole word (case-insensitive)."""
    lowered = prompt.lower()
    # the substring test first: it is cheap and rules out almost every LoRA of a large library
    return any(word.strip() and word.lower() in lowered
               and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)
               for word in trigger_words)


def cosine_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of one query (dim,) with each row of keys (n, dim): per-row norms, not a global one."""
    return F.normalize(keys.float(), dim=-1) @ F.normalize(query.float().reshape(-1), dim=0)


def rank_by_similarity(prompt: str, similarities: torch.Tensor, entries: Sequence[LibraryEntry], *, top_k: int = 3,
                       category_limits: Mapping[str, int] | None = None,
                       trigger_boost: float = TRIGGER_BOOST) -> list[RankedLora]:
    """Add the trigger boost to each entry's similarity, sort, and pick up to ``top_k`` under the category limits."""
    check_top_k(top_k)
    limits = DEFAULT_CATEGORY_LIMITS if category_limits is None else category_limits
    matches = [trigger_in_prompt(prompt, entry.trigger_words) for entry in entries]
    values = similarities.tolist()
    scored = [RankedLora(entry, value + trigger_boost * match, value, match)
              for entry, value, match in zip(entries, values, matches)]
    scored.sort(key=lambda ranked: (-ranked.score, ranked.entry.file))
    return select_under_limits(scored, top_k, limits)


def select_under_limits(ranked: Sequence[RankedLora], top_k: int, limits: Mapping[str, int]) -> list[RankedLora]:
    """The best ``top_k`` with at most ``limits[category]`` LoRAs of each limited category; LoRAs whose
    trigger is in the prompt are always kept (the prompt asks for them) but count towards their limit."""
    chosen: list[RankedLora] = []
    used: dict[str, int] = {}
    for candidate in ranked:
        if len(chosen) == top_k:
            break
        category = (candidate.entry.category or "").lower()
        if category in limits and used.get(category, 0) >= limits[category] and not candidate.trigger_match:
            continue
        used[category] = used.get(category, 0) + 1
        chosen.append(candidate)
    return chosen


def check_top_k(top_k: int) -> None:
    if int(top_k) < 1:
        raise UserError(f"--top {top_k}: ask for at least 1 LoRA")


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty; give the prompt to retrieve LoRAs for")
    return prompt.strip()


class EmbeddingCache:
    """Embeddings of library entries, computed once per (file, size, mtime, what was embedded)."""

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, entries: Sequence[LibraryEntry], tag: str, compute) -> torch.Tensor:
        keys = [(entry.file, entry.size, entry.mtime_ns, tag) for entry in entries]
        missing = [entry for entry, key in zip(entries, keys) if key not in self._store]
        if missing:
            for entry, vector in zip(missing, compute(missing)):
                self._store[(entry.file, entry.size, entry.mtime_ns, tag)] = vector
        if not keys:
            return torch.zeros(0)
        return torch.stack([self._store[key] for key in keys])


_DEFAULT_CACHE = EmbeddingCache()


def rank_loras(prompt: str, library: LibraryIndex, embedder: TextEmbedder, *, top_k: int = 3,
               architecture: str | None = None, retriever: "WeightRetriever | None" = None,
               category_limits: Mapping[str, int] | None = None, trigger_boost: float = TRIGGER_BOOST,
               cache: EmbeddingCache | None = None) -> list[RankedLora]:
    """Rank the library's LoRAs for ``prompt``: tier 1 (metadata text) or, with ``retriever``, tier 2 (weights).

    Args:
        prompt: the generation prompt.
        library: from :func:`~loracompose.library.open_library`.
        embedder: text embeddings (e.g. :class:`PipelineTextEmbedder` of the base model).
        top_k: how many LoRAs to return (fewer if the library or the category limits run out).
        architecture: keep only LoRAs for this base model (``"sd15"``/``"sdxl"``; unknown ones are kept).
        retriever: a trained :class:`WeightRetriever`; None: the training-free tier.
        category_limits: most LoRAs per category; default one character, one style, one background.
        trigger_boost: added to the cosine of LoRAs whose trigger word is in the prompt.
    """
    prompt = check_prompt(prompt)
    check_top_k(top_k)
    entries = library.for_architecture(architecture)
    if not entries:
        return []
    cache = cache or _DEFAULT_CACHE
    query = embedder.embed([prompt])[0]
    if retriever is None:
        keys = cache.get(entries, f"text:{embedder.fingerprint}",
                         lambda missing: embedder.embed([entry.metadata_text() for entry in missing]))
    else:
        retriever.check_embedder(embedder, query)
        keys = cache.get(entries, f"weights:{retriever.fingerprint}",
                         lambda missing: retriever.embed_files([library.path_of(entry) for entry in missing]))
    return rank_by_similarity(prompt, cosine_scores(query, keys), entries, top_k=top_k,
                              category_limits=category_limits, trigger_boost=trigger_boost)


def auto_lora_specs(pipe: Any, prompt: str, library: str | Path | LibraryIndex, top_k: int, *,
                    retriever: str | Path | None = None, weight: float = 1.0,
                    category_limits: Mapping[str, int] | None = None) -> tuple[list[Any], list[RankedLora]]:
    """``generate --auto-loras K``: the top-k LoRAs of a library for the prompt, as LoraSpecs for ``pipe``.

    Ranked with the pipeline's own text encoder(s) (tier 1), or with a trained retriever file (tier 2);
    only LoRAs made for the pipeline's base model (or of unknown base) are considered.
    """
    index = library if isinstance(library, LibraryIndex) else open_library(library)
    encoder = load_retriever(retriever) if retriever is not None else None
    ranked = rank_loras(prompt, index, PipelineTextEmbedder(pipe), top_k=top_k, architecture=pipe.architecture,
                        retriever=encoder, category_limits=category_limits)
    return index.specs([item.entry for item in ranked], weight=weight), ranked


def rank_lora_files(pipe: Any, prompt: str, loras: Mapping[str, Path], top_k: int, *,
                    category_limits: Mapping[str, int] | None = None) -> list[RankedLora]:
    """Tier-1 ranking of LoRA files outside a library (the UI's session LoRAs), keyed by adapter name:
    each result's ``entry.name`` is the adapter name it was given under."""
    entries = []
    for name, path in loras.items():
        stat = Path(path).stat()
        entry = entry_from_lora(str(path), inspect_lora(LoraSpec(path, name=name)), stat.st_size, stat.st_mtime_ns)
        entries.append(replace(entry, name=name))
    if not entries:
        return []
    embedder = PipelineTextEmbedder(pipe)
    query = embedder.embed([check_prompt(prompt)])[0]
    keys = embedder.embed([entry.metadata_text() for entry in entries])
    return rank_by_similarity(prompt, cosine_scores(query, keys), entries, top_k=top_k, category_limits=category_limits)


def format_ranking(ranked: Sequence[RankedLora]) -> str:
    """``retrieve``'s output: one line per LoRA, best first: score, name, file, category, trigger mark."""
    lines = [f"{'score':>7}  {'cosine':>7}  name (file; category)"]
    for item in ranked:
        mark = "  [trigger in prompt]" if item.trigger_match else ""
        lines.append(f"{item.score:7.3f}  {item.similarity:7.3f}  {item.entry.name} ({item.entry.file}; "
                     f"{item.entry.category or 'no category'}){mark}")
    return "\n".join(lines)


def parse_category_limits(text: str | None) -> dict[str, int] | None:
    """``--category-limit character=2,style=1`` -> limits over the defaults; None: the defaults."""
    if not text:
        return None
    limits = dict(DEFAULT_CATEGORY_LIMITS)
    for part in text.split(","):
        category, sep, value = part.partition("=")
        if not sep or not category.strip() or not value.strip().isdigit():
            raise UserError(f"--category-limit {text!r}: use CATEGORY=N pairs, e.g. character=2,style=1")
        limits[category.strip().lower()] = int(value)
    return limits


# ------------------------------------------------------------------------------------ LoRA weights


@dataclass(frozen=True)
class AdaptedLayer:
    """One UNet layer a LoRA adapts: its module name, sizes, and kind (which projection ``P`` it shares)."""

    name: str
    in_features: int
    out_features: int

    @property
    def kind(self) -> str:
        """Layers of the same role and width share a projection, e.g. ``attn2.to_k:320``."""
        words = [part for part in self.name.split(".") if not part.isdigit()]
        return f"{'.'.join(words[-2:])}:{self.out_features}".replace(".", "_")


LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, d_in), s·B (d_out, r))


def read_unet_factors(path: Path) -> LoraFactors:
    """The UNet low-rank factors of a LoRA file, with B scaled by alpha/r.

    diffusers/PEFT files (``unet.<module>.lora_A.weight``) are read directly; other formats (kohya,
    old diffusers) go through diffusers' own conversion. Conv factors are flattened to matrices
    (A: (r, d_in·k·k), B: (d_out, r)).
    """
    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
            direct = _is_peft_unet(keys)
            state = {key.removeprefix("unet."): handle.get_tensor(key) for key in keys if key.startswith("unet.")} \
                if direct else None
    except (SafetensorError, OSError) as error:
        raise UserError(f"LoRA file {path} cannot be read ({_first_line(error)}); remove or replace it") from None
    if state is None:
        state, alphas = _converted_unet_state(path)
    else:
        alphas = _metadata_alphas(metadata)
    return _factors(state, alphas)


def _is_peft_unet(keys: Sequence[str]) -> bool:
    unet = [key for key in keys if key.startswith("unet.")]
    return bool(unet) and all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in unet)


def _converted_unet_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """UNet LoRA tensors in PEFT naming without the ``unet.`` prefix, and alpha per module, via diffusers."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    from loracompose.pipelines.compose_pipeline import quiet_loading

    try:
        with quiet_loading():
            state, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path),
                                                                                      return_lora_metadata=True)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
        raise UserError(f"LoRA file {path} cannot be read as a LoRA ({_first_line(error)}); "
                        "remove or replace it") from None
    unet = convert_unet_state_dict_to_peft({key.removeprefix("unet."): value for key, value in state.items()
                                            if key.startswith("unet.")})
    if not network_alphas:
        return unet, _metadata_alphas(metadata or {})
    named = {key.removeprefix("unet.").removesuffix(".alpha"): value for key, value in network_alphas.items()
             if key.startswith("unet.")}
    converted = convert_unet_state_dict_to_peft(named)
    return unet, {key.removesuffix(".lora_A.weight"): float(value) for key, value in converted.items()}


def _metadata_alphas(metadata: Mapping[str, Any]) -> dict[str, float]:
    """Alpha for every module (``"*"``) from diffusers' adapter metadata or loracompose's key; none: alpha = r."""
    adapter = metadata.get("lora_adapter_metadata")
    if isinstance(adapter, str):
        try:
            adapter = json.loads(adapter)
        except json.JSONDecodeError:
            adapter = None
    if isinstance(adapter, Mapping) and "unet.lora_alpha" in adapter:
        return {"*": float(adapter["unet.lora_alpha"])}
    if "unet.lora_alpha" in metadata:
        return {"*": float(metadata["unet.lora_alpha"])}
    stored = metadata.get("loracompose.alpha")
    return {"*": float(stored)} if stored else {}


def _factors(unet: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> LoraFactors:
    factors: LoraFactors = {}
    for key, down in unet.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        up = unet.get(f"{module}.lora_B.weight")
        if up is None:
            continue
        rank = down.shape[0]
        scale = alphas.get(module, alphas.get("*", rank)) / rank
        factors[module] = (down.reshape(rank, -1).float(), up.reshape(up.shape[0], rank).float() * scale)
    return factors


def _check_safetensors_file(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path} is not a .safetensors file; only safetensors are loaded "
                        "(pickled formats can run code)")
    if not path.is_file():
        raise UserError(f"file not found: {path}; check the path")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def layer_schema(factor_sets: Sequence[LoraFactors]) -> tuple[AdaptedLayer, ...]:
    """The union of adapted layers over LoRAs, sorted by name; a layer's shape must agree across files."""
    shapes: dict[str, tuple[int, int]] = {}
    for factors in factor_sets:
        for name, (down, up) in factors.items():
            shape = (down.shape[1], up.shape[0])
            if shapes.setdefault(name, shape) != shape:
                raise UserError(f"LoRA layer {name} has shape {shape} in one file and {shapes[name]} in another; "
                                "the library mixes base models: keep one base model per library")
    if not shapes:
        raise UserError("no LoRA in the library adapts the UNet; the retriever needs UNet LoRA layers")
    return tuple(AdaptedLayer(name, *shapes[name]) for name in sorted(shapes))


@dataclass
class StackedFactors:
    """Factors of several LoRAs per schema layer, ranks zero-padded: A (N, r_max, d_in), B (N, d_out, r_max).

    Zero rows of A and columns of B add nothing to q·Aᵀ·Bᵀ, so padding changes no token.
    """

    down: list[torch.Tensor]
    up: list[torch.Tensor]

    @property
    def count(self) -> int:
        return int(self.down[0].shape[0])

    def select(self, indices: Sequence[int]) -> "StackedFactors":
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        return StackedFactors([a[rows] for a in self.down], [b[rows] for b in self.up])

    def to(self, device: torch.device) -> "StackedFactors":
        return StackedFactors([a.to(device) for a in self.down], [b.to(device) for b in self.up])


def stack_factors(factor_sets: Sequence[LoraFactors], layers: Sequence[AdaptedLayer]) -> StackedFactors:
    downs, ups = [], []
    for layer in layers:
        present = [factors[layer.name] for factors in factor_sets if layer.name in factors]
        rank = max((down.shape[0] for down, _ in present), default=1)
        down = torch.zeros(len(factor_sets), rank, layer.in_features)
        up = torch.zeros(len(factor_sets), layer.out_features, rank)
        for index, factors in enumerate(factor_sets):
            if layer.name in factors:
                a, b = factors[layer.name]
                down[index, :a.shape[0]] = a
                up[index, :, :b.shape[1]] = b
        downs.append(down)
        ups.append(up)
    return StackedFactors(downs, ups)


# ------------------------------------------------------------------------------------ the weight encoder


@dataclass(frozen=True)
class RetrieverConfig:
    """The encoder's shape and what it was trained against (stored in the retriever file)."""

    layers: tuple[AdaptedLayer, ...]
    text_dim: int
    width: int = 768
    depth: int = 2
    heads: int = 12
    mlp: int = 3072
    text_embedder: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RetrieverConfig":
        values = dict(data)
        values["layers"] = tuple(AdaptedLayer(**layer) for layer in values["layers"])
        return cls(**values)


class WeightRetriever(torch.nn.Module):
    """LoRA weights -> an embedding in the text encoder's space (tier 2; see the module docstring)."""

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        if config.width % config.heads:
            raise UserError(f"retriever width {config.width} is not divisible by its {config.heads} heads; "
                            "pick a width that is a multiple of the head count")
        self.config = config
        self.probes = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n) / math.sqrt(n))
                                              for n in (layer.in_features for layer in config.layers)])
        kinds = sorted({(layer.kind, layer.out_features) for layer in config.layers})
        self.projections = torch.nn.ModuleDict({kind: _token_projection(out, config.width) for kind, out in kinds})
        self.positions = torch.nn.Parameter(torch.randn(len(config.layers), config.width) * 0.02)
        block = torch.nn.TransformerEncoderLayer(config.width, config.heads, config.mlp, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(block, config.depth, enable_nested_tensor=False)
        self.final_norm = torch.nn.LayerNorm(config.width)
        self.output = torch.nn.Linear(config.width, config.text_dim)
        self.instance = uuid.uuid4().hex  # keys cached LoRA embeddings: weights are fixed once used for ranking

    @property
    def fingerprint(self) -> str:
        return f"{self.config.text_embedder}:{self.instance}"

    def tokens(self, factors: StackedFactors) -> torch.Tensor:
        """(N, L, width): per layer, the probe through s·B·A, layer-normed and projected, plus its position."""
        per_layer = []
        for layer, probe, down, up in zip(self.config.layers, self.probes, factors.down, factors.up):
            through = torch.einsum("nor,nr->no", up, torch.einsum("nri,i->nr", down, probe))
            per_layer.append(self.projections[layer.kind](through))
        return torch.stack(per_layer, dim=1) + self.positions

    def forward(self, factors: StackedFactors) -> torch.Tensor:
        """(N, text_dim) LoRA embeddings (not normalised; rank by cosine)."""
        hidden = self.final_norm(self.encoder(self.tokens(factors)))
        return self.output(hidden.mean(dim=1))

    def embed_files(self, paths: Sequence[Path], batch_size: int = 16) -> torch.Tensor:
        """(len(paths), text_dim) embeddings of LoRA files; layers outside the schema are ignored."""
        device = next(self.parameters()).device
        chunks = []
        with torch.no_grad():
            for start in range(0, len(paths), batch_size):
                factor_sets = [read_unet_factors(Path(path)) for path in paths[start:start + batch_size]]
                self._check_overlap(factor_sets, paths[start:start + batch_size])
                chunks.append(self(stack_factors(factor_sets, self.config.layers).to(device)).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.config.text_dim)

    def _check_overlap(self, factor_sets: Sequence[LoraFactors], paths: Sequence[Path]) -> None:
        known = {(layer.name, layer.in_features, layer.out_features) for layer in self.config.layers}
        for factors, path in zip(factor_sets, paths):
            if not any((name, a.shape[1], b.shape[0]) in known for name, (a, b) in factors.items()):
                raise UserError(f"LoRA file {path} shares no layer with the retriever's training LoRAs; use a "
                                "retriever trained for this base model")

    def check_embedder(self, embedder: TextEmbedder, sample: torch.Tensor) -> None:
        if sample.shape[-1] != self.config.text_dim:
            raise UserError(f"the retriever was trained against {self.config.text_dim}-wide text embeddings "
                            f"({self.config.text_embedder}) but this model's are {sample.shape[-1]}-wide; "
                            "use the base model the retriever was trained with")


def _token_projection(channels: int, width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.LayerNorm(channels, elementwise_affine=False), torch.nn.Linear(channels, width))


def save_retriever(retriever: WeightRetriever, path: Path, extra: Mapping[str, str] | None = None) -> Path:
    """Write the retriever as safetensors (weights + JSON config in the metadata), atomically."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in retriever.state_dict().items()}
    metadata = {"format": RETRIEVER_FORMAT, RETRIEVER_CONFIG_KEY: _json(retriever.config.to_json()), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))


def load_retriever(path: str | Path, device: str | torch.device = "cpu") -> WeightRetriever:
    """Load a retriever written by :func:`save_retriever` / :func:`train_retriever` (safetensors only)."""
    path = Path(path)
    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        if metadata.get("format") != RETRIEVER_FORMAT:
            raise UserError(f"{path} is not a loracompose retriever file (format {metadata.get('format')!r}); "
                            "train one with train-retriever")
        retriever = WeightRetriever(RetrieverConfig.from_json(_unjson(metadata[RETRIEVER_CONFIG_KEY])))
        retriever.load_state_dict(load_file(str(path)))
    except (SafetensorError, KeyError, ValueError, RuntimeError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"retriever file {path} is damaged ({_first_line(error)}); train it again") from None
    return retriever.to(device).eval()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _unjson(text: str) -> Any:
    return json.loads(text)


# ------------------------------------------------------------------------------------ training


@dataclass
class RetrieverTrainingSettings:
    """``train-retriever``: a library of LoRAs with descriptions, and how to train the weight encoder.

    Args:
        library: the LoRA library folder (descriptions and ``loracompose.captions`` in the files' metadata).
        out: the ``.safetensors`` retriever file to write.
        model: the base model whose text encoder gives the target embeddings (ignored if an embedder is passed).
        steps, batch_size, learning_rate, temperature: InfoNCE training (AdamW; a batch is that many LoRAs).
        width, depth, heads, mlp: the transformer (reference: 768, 2, 12, 3072).
        checkpoint_every, keep_checkpoints, work_dir, resume: as the LoRA trainers.
    """

    library: Path
    out: Path
    model: str | None = None
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-4
    temperature: float = 0.07
    width: int = 768
    depth: int = 2
    heads: int = 12
    mlp: int = 3072
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    work_dir: Path | None = None
    resume: bool = False
    device: str = "auto"
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.library, self.out = Path(self.library), Path(self.out)
        self.work_dir = checkpoint_folder(self.out, self.work_dir)


@dataclass(frozen=True)
class ResolvedRetrieverSettings:
    """What a checkpoint must agree with to be resumed."""

    library_files: tuple[str, ...]
    text_embedder: str
    batch_size: int
    learning_rate: float
    temperature: float
    width: int
    depth: int
    heads: int
    mlp: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return _unjson(_json(asdict(self)))


@dataclass
class TrainableParameters:
    """The parameters a shared checkpoint writer (:mod:`loracompose.training`) saves and restores."""

    trainable: dict[str, torch.nn.Parameter]


@dataclass
class RetrieverTrainingResult:
    path: Path
    steps: int
    history: list[dict[str, float]]
    retriever: WeightRetriever
    entries: list[LibraryEntry]
    work_dir: Path
    resumed_from: int = 0
    train_seconds: float = 0.0


@dataclass
class RetrievalData:
    """The training set: stacked LoRA factors and every caption's frozen text embedding."""

    entries: list[LibraryEntry]
    factors: StackedFactors
    caption_embeddings: list[torch.Tensor]  # per LoRA: (captions, text_dim)
    layers: tuple[AdaptedLayer, ...]


def retrieval_data(library: LibraryIndex, embedder: TextEmbedder, architecture: str | None = None) -> RetrievalData:
    entries = library.for_architecture(architecture)
    if len(entries) < 2:
        raise UserError(f"--library {library.root} holds {len(entries)} usable LoRA(s); the retriever needs at "
                        "least 2 to contrast")
    factor_sets = [read_unet_factors(library.path_of(entry)) for entry in entries]
    layers = layer_schema(factor_sets)
    captions = [embedder.embed(list(entry.training_captions())) for entry in entries]
    return RetrievalData(entries, stack_factors(factor_sets, layers), captions, layers)


def info_nce(lora_embeddings: torch.Tensor, text_embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE with cosine logits: row i of each side is the positive pair."""
    logits = F.normalize(lora_embeddings, dim=-1) @ F.normalize(text_embeddings, dim=-1).T / temperature
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def batch_draw(step: int, data: RetrievalData, batch_size: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """The LoRAs of a step (a seeded random subset) and one seeded caption embedding of each."""
    rng = generator(seed, "retriever-step", step)
    count = len(data.entries)
    indices = torch.randperm(count, generator=rng)[:min(batch_size, count)].tolist()
    texts = [data.caption_embeddings[i][int(torch.randint(len(data.caption_embeddings[i]), (1,), generator=rng))]
             for i in indices]
    return indices, torch.stack(texts)


def train_retriever(settings: RetrieverTrainingSettings,
                    embedder: TextEmbedder | None = None) -> RetrieverTrainingResult:
    """Train the weight-encoding retriever on a library and write it as safetensors (see the module docstring).

    ``embedder`` replaces the base model's text encoder (``settings.model``) as the source of targets.
    """
    _check_retriever_settings(settings)
    check_work_dir(settings)
    embedder, architecture = embedder_for(settings.model, embedder)
    data = retrieval_data(open_library(settings.library), embedder, architecture)
    resolved = ResolvedRetrieverSettings(
        tuple(entry.file for entry in data.entries), embedder.fingerprint, settings.batch_size, settings.learning_rate,
        settings.temperature, settings.width, settings.depth, settings.heads, settings.mlp, settings.seed)
    config = RetrieverConfig(data.layers, int(data.caption_embeddings[0].shape[-1]), settings.width, settings.depth,
                             settings.heads, settings.mlp, embedder.fingerprint)
    with seeded_global_rng(derived_seed(settings.seed, "retriever-init", 0)):
        retriever = WeightRetriever(config)
    optimizer = torch.optim.AdamW(retriever.parameters(), lr=settings.learning_rate)
    holder = TrainableParameters(dict(retriever.named_parameters()))
    start, history = 0, []
    if settings.resume:
        state = load_checkpoint(holder, optimizer, resolved, checkpoint_dirs(settings.work_dir)[-1])
        start, history = int(state["step"]), list(state["history"])
    seconds = _retriever_loop(retriever, optimizer, holder, data, settings, resolved, start, history)
    retriever.eval()
    training = _json({**resolved.to_json(), "steps": settings.steps})
    save_retriever(retriever, settings.out, {"loracompose.training": training})
    return RetrieverTrainingResult(settings.out, settings.steps, history, retriever, data.entries, settings.work_dir,
                                   start, seconds)


def _retriever_loop(retriever: WeightRetriever, optimizer: torch.optim.Optimizer, holder: TrainableParameters,
                    data: RetrievalData, settings: RetrieverTrainingSettings, resolved: ResolvedRetrieverSettings,
                    start: int, history: list) -> float:
    retriever.train()
    bar = tqdm(total=settings.steps, initial=start, desc="train retriever", disable=not settings.show_progress,
               unit="step")
    seconds = 0.0
    for step in range(start, settings.steps):
        started = time.perf_counter()
        indices, texts = batch_draw(step, data, settings.batch_size, settings.seed)
        loss = info_nce(retriever(data.factors.select(indices)), texts, settings.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        history.append({"step": step + 1, "loss": float(loss.detach())})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            save_checkpoint(holder, optimizer, resolved, settings.work_dir, done, history, {},
                            settings.keep_checkpoints)
    bar.close()
    return seconds


def _check_retriever_settings(settings: RetrieverTrainingSettings) -> None:
    if settings.out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {settings.out}: name the retriever file .safetensors")
    for label, value in (("--steps", settings.steps), ("--batch-size", settings.batch_size),
                         ("--checkpoint-every", settings.checkpoint_every)):
        if int(value) < 1:
            raise UserError(f"{label} {value}: use a positive integer")
    if settings.batch_size < 2:
        raise UserError(f"--batch-size {settings.batch_size}: contrastive training needs at least 2 LoRAs per batch")
    if settings.learning_rate <= 0 or settings.temperature <= 0:
        raise UserError("--lr and --temperature must be positive numbers")


def embedder_for(model: str | None, embedder: TextEmbedder | None) -> tuple[TextEmbedder, str | None]:
    """The given embedder (any architecture), or the base model's text encoder and its architecture."""
    if embedder is not None:
        return embedder, None
    if not model:
        raise UserError("--model is needed: its text encoder embeds the LoRA descriptions and prompts")
    from loracompose.pipelines import load_pipeline
    from loracompose.pipelines.compose_pipeline import quiet_loading

    with quiet_loading():
        pipe = load_pipeline(model)
    return PipelineTextEmbedder(pipe), pipe.architecture


# ------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class RecallReport:
    """recall@k over queries, with the chance level k/N of a random ranking."""

    recall: dict[int, float]
    chance: dict[int, float]
    queries: int
    loras: int

    def to_json(self) -> dict[str, Any]:
        return {"recall": self.recall, "chance": self.chance, "queries": self.queries, "loras": self.loras}


def recall_at_k(query_embeddings: torch.Tensor, lora_embeddings: torch.Tensor, targets: Sequence[int],
                ks: Sequence[int] = (1, 3)) -> RecallReport:
    """Fraction of queries whose target LoRA is among the k best by cosine."""
    scores = F.normalize(query_embeddings.float(), dim=-1) @ F.normalize(lora_embeddings.float(), dim=-1).T
    order = scores.argsort(dim=1, descending=True)
    target = torch.as_tensor(list(targets)).reshape(-1, 1)
    position = (order == target).float().argmax(dim=1)
    count = lora_embeddings.shape[0]
    return RecallReport({k: float((position < k).float().mean()) for k in ks}, {k: min(k, count) / count for k in ks},
                        len(targets), count)


def evaluate_retriever(retriever: WeightRetriever, library: LibraryIndex, embedder: TextEmbedder,
                       queries: Mapping[str, Sequence[str]], ks: Sequence[int] = (1, 3)) -> RecallReport:
    """recall@k of held-out prompts: ``queries`` maps a library file (relative path) to prompts meant for it."""
    entries = library.sorted_entries()
    position = {entry.file: index for index, entry in enumerate(entries)}
    unknown = sorted(set(queries) - set(position))
    if unknown:
        raise UserError(f"evaluation queries name {unknown[0]!r}, which is not in the library; use library file names")
    prompts = [(prompt, position[file]) for file, texts in queries.items() for prompt in texts]
    lora_embeddings = retriever.embed_files([library.path_of(entry) for entry in entries])
    return recall_at_k(embedder.embed([p for p, _ in prompts]), lora_embeddings, [t for _, t in prompts], ks)
