"""The weight-encoding retriever (tier 2): LoRA weights -> an embedding in the text encoder's space, and its file.

    for each adapted UNet layer l of a LoRA (A_l, B_l, scale s_l = alpha/r):
        t_l <- P_kind(l)(LN(s_l · q_l·A_lᵀ·B_lᵀ)) + pos_l      # q_l: learned probe (1 x d_in); P: d_out -> width
    z <- mean over l of LN(Transformer([t_1 .. t_L]))        # no causal mask: the layers are a set
    e_lora <- W_out·z                                         # into the text embedding's space

Each token is layer-normed before its projection because LoRA deltas differ by orders of magnitude
between files; the output projection maps the pooled embedding to the text embedding's width (the
reference's widths coincide). Training: :mod:`loracompose.training.retriever`.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from loracompose.errors import UserError, first_line
from loracompose.outputs import atomic_write
from loracompose.retrieval.lora_factors import AdaptedLayer, LoraFactors, StackedFactors, check_safetensors_file, \
    read_unet_factors, stack_factors
from loracompose.retrieval.text import TextEmbedder
from loracompose.validation import check_finite_tensors


RETRIEVER_FORMAT = "loracompose.autolora-retriever/1"


RETRIEVER_CONFIG_KEY = "loracompose.retriever_config"


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
    def from_json(cls, data: Mapping[str, Any]) -> RetrieverConfig:
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
    config = json.dumps(retriever.config.to_json(), sort_keys=True)
    metadata = {"format": RETRIEVER_FORMAT, RETRIEVER_CONFIG_KEY: config, **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))


def load_retriever(path: str | Path, device: str | torch.device = "cpu") -> WeightRetriever:
    """Load a retriever written by :func:`save_retriever` or
    :func:`~loracompose.training.retriever.train_retriever` (safetensors only)."""
    path = Path(path)
    check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        if metadata.get("format") != RETRIEVER_FORMAT:
            raise UserError(f"{path} is not a loracompose retriever file (format {metadata.get('format')!r}); "
                            "train one with train-retriever")
        retriever = WeightRetriever(RetrieverConfig.from_json(json.loads(metadata[RETRIEVER_CONFIG_KEY])))
        tensors = load_file(str(path))
        check_finite_tensors(tensors, f"retriever file {path}")
        retriever.load_state_dict(tensors)
    except (SafetensorError, KeyError, ValueError, RuntimeError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"retriever file {path} is damaged ({first_line(error)}); train it again") from None
    return retriever.to(device).eval()


