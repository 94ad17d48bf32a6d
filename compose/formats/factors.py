"""Every loaded format as exact LoRA factors: ``delta W = scale * up @ down``.

PEFT's LoRA layer is what every composition method works with (per-row adapters, token-masked
deltas, gates), so each format is turned into a pair of factors that PEFT's LoRA layer applies
exactly, with no approximation:

* **LoRA / LoCon**: the file's ``lora_down`` / ``lora_up``; a Tucker core ``lora_mid`` is folded into
  the down convolution (``down'[p,i,h,w] = sum_q mid[p,q,h,w] down[q,i]``). Scale alpha / rank.
* **LoHa** ``(w1a w1b) ⊙ (w2a w2b)``: the Hadamard product of two low-rank matrices is the product of
  their row-wise Khatri-Rao factors, rank ``r1 * r2``. Scale alpha / dim, dim = rows of ``hada_w1_b``.
  With Tucker cores (``hada_t1``/``hada_t2``) the delta is materialised (see below).
* **LoKr** ``kron(W1, W2)``: ``kron(A1 B1, A2 B2) = kron(A1, A2) kron(B1, B2)``; a factor stored whole is
  written as ``W I`` or ``I W`` (whichever is smaller). Scale alpha / dim only where a factor is
  decomposed (dim = rows of that factor's ``_b``), else 1. A Tucker ``lokr_t2`` is rebuilt first.
* **Materialised deltas** (LoHa with Tucker cores, DoRA): the full ``delta W`` is computed here and
  written as ``delta W @ I`` or ``I @ delta W``, rank ``min(out, in * k * k)``: exact, at the cost of a
  full-rank layer.

The scaling conventions are those of LyCORIS and ComfyUI; a missing alpha means scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankDelta:
    """``delta W = (alpha / rank) * up @ down`` for one layer, shaped for PEFT's LoRA layer.

    ``down`` is (rank, in) or (rank, in, kh, kw); ``up`` is (out, rank) or (out, rank, 1, 1).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The materialised ``delta W`` (float32), shaped like the layer's weight."""
        down, up = self.down.float(), self.up.float()
        product = up.reshape(up.shape[0], -1) @ down.reshape(self.rank, -1)
        return self.scale * product.reshape(up.shape[0], *down.shape[1:])


def fit_to_layer(delta: LowRankDelta, weight_shape: torch.Size) -> LowRankDelta:
    """Reshape factors to the layer: 2-D factors on a 1x1 convolution and 1x1 factors on a Linear, as
    kohya and diffusers store them for ``proj_in``/``proj_out`` (Linear in SDXL, 1x1 conv in SD1.5)."""
    out_features, in_features = int(weight_shape[0]), int(weight_shape[1])
    down, up = delta.down, delta.up
    if len(weight_shape) == 4:
        kernel = tuple(weight_shape[2:])
        if down.ndim == 2:
            down = down.reshape(delta.rank, in_features, *kernel)
        up = up.reshape(out_features, delta.rank, 1, 1)
    else:
        down = down.reshape(delta.rank, in_features)
        up = up.reshape(out_features, delta.rank)
    return LowRankDelta(down, up, delta.alpha)


def lora_factors(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None, alpha: float | None) -> LowRankDelta:
    """kohya / LyCORIS LoRA and LoCon, with an optional Tucker ``lora_mid`` core."""
    rank = down.shape[0]
    if mid is not None:
        down = torch.einsum("pqhw,qi->pihw", mid.float(), down.float().reshape(rank, -1)).contiguous()
    return LowRankDelta(down, up, float(alpha) if alpha is not None else float(rank))


def _tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker rebuild: ``W[p,r,h,w] = sum_ij core[i,j,h,w] w_b[j,r] w_a[i,p]``."""
    return torch.einsum("ijhw,jr,ip->prhw", core.float(), w_b.float(), w_a.float()).contiguous()


def full_rank(delta: torch.Tensor, alpha_scale: float = 1.0) -> LowRankDelta:
    """An exact factorisation of a materialised delta: ``delta @ I`` or ``I @ delta``, the smaller rank."""
    out_features = delta.shape[0]
    matrix = delta.float().reshape(out_features, -1)
    inner = matrix.shape[1]
    if out_features <= inner:
        down, up = matrix, torch.eye(out_features)
    else:
        down, up = torch.eye(inner), matrix
    rank = down.shape[0]
    down = down.reshape(rank, *delta.shape[1:])
    up = up.reshape(out_features, rank, *[1] * (delta.ndim - 2))
    return LowRankDelta(down, up, alpha_scale * rank)


def loha_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                 t1: torch.Tensor | None, t2: torch.Tensor | None, alpha: float | None,
                 weight_shape: torch.Size) -> LowRankDelta:
    """LyCORIS LoHa ``(w1a w1b) ⊙ (w2a w2b)``, scale alpha / dim (dim = rows of ``hada_w1_b``)."""
    dim = w1b.shape[0]
    scale = float(alpha) / dim if alpha is not None else 1.0
    if t1 is not None or t2 is not None:
        if t1 is None or t2 is None:
            raise ValueError("a LoHa layer has one Tucker core (hada_t1/hada_t2) without the other")
        delta = _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b)
        return full_rank(delta.reshape(weight_shape), scale)
    r1, r2 = w1a.shape[1], w2a.shape[1]
    up = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).reshape(w1a.shape[0], r1 * r2)
    down = (w1b.float()[:, None, :] * w2b.float()[None, :, :]).reshape(r1 * r2, -1)
    return LowRankDelta(down, up, scale * r1 * r2)


def _lokr_factor(full: torch.Tensor | None, w_a: torch.Tensor | None, w_b: torch.Tensor | None,
                 core: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Kronecker factor as (left, right) with ``factor = left @ right`` (2-D, kernel flattened)."""
    if full is None:
        if w_a is None or w_b is None:
            raise ValueError("a LoKr factor has neither lokr_wN nor both lokr_wN_a and lokr_wN_b")
        if core is None:
            return w_a.float(), w_b.float().reshape(w_b.shape[0], -1)
        full = _tucker(core, w_a, w_b)
    matrix = full.float().reshape(full.shape[0], -1)
    rows, columns = matrix.shape
    return (matrix, torch.eye(columns)) if columns <= rows else (torch.eye(rows), matrix)


def lokr_factors(parts: dict[str, torch.Tensor], alpha: float | None) -> LowRankDelta:
    """LyCORIS LoKr ``kron(W1, W2)`` from ``lokr_w1`` or ``lokr_w1_a/_b`` and ``lokr_w2`` or
    ``lokr_w2_a/_b`` (with ``lokr_t2``). Scale alpha / dim where a factor is decomposed (dim: rows of
    ``lokr_w2_b``, else of ``lokr_w1_b``), else 1 (LyCORIS and ComfyUI)."""
    decomposed = parts.get("lokr_w2_b") if "lokr_w2" not in parts else None
    if decomposed is None and "lokr_w1" not in parts:
        decomposed = parts.get("lokr_w1_b")
    scale = float(alpha) / decomposed.shape[0] if alpha is not None and decomposed is not None else 1.0
    left1, right1 = _lokr_factor(parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b"),
                                 parts.get("lokr_t1"))
    left2, right2 = _lokr_factor(parts.get("lokr_w2"), parts.get("lokr_w2_a"), parts.get("lokr_w2_b"),
                                 parts.get("lokr_t2"))
    up, down = torch.kron(left1, left2), torch.kron(right1, right2)
    return LowRankDelta(down, up, scale * down.shape[0])


def dora_delta(delta: torch.Tensor, base_weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The weight change of a DoRA layer: ``m * (W + dW) / ||W + dW|| - W``.

    The norm is taken per output channel when ``magnitude`` has one value per output (PEFT's
    ``lora_magnitude_vector``, LyCORIS's default ``dora_scale``), else per input channel (LyCORIS
    with ``wd_on_out`` off), as LyCORIS does.
    """
    weight = base_weight.float()
    merged = weight + delta.float().reshape(weight.shape)
    out_features = weight.shape[0]
    eps = torch.finfo(torch.float32).eps
    if magnitude.numel() == out_features and (magnitude.ndim == 1 or magnitude.shape[0] == out_features):
        norm = merged.reshape(out_features, -1).norm(dim=1).reshape(out_features, *[1] * (weight.ndim - 1))
        scale = magnitude.float().reshape(norm.shape) / (norm + eps)
    else:
        columns = merged.transpose(0, 1)
        norm = columns.reshape(columns.shape[0], -1).norm(dim=1)
        norm = norm.reshape(columns.shape[0], *[1] * (weight.ndim - 1)).transpose(0, 1)
        scale = magnitude.float().reshape(norm.shape) / (norm + eps)
    return merged * scale - weight
