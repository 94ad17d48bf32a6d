"""The converter: a LoRA file's tensors to exact PEFT LoRA factors per layer, and loading them into a
pipeline (see the package docstring for the formats)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, cast

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from loracompose.errors import UserError, first_line
from loracompose.validation import check_finite_tensors

from .dit_names import DIT, FAMILY_NAMES, RowSplit, fits_family, model_family, spelling_family
from .factors import LowRankDelta, dora_delta, fit_to_layer, full_rank, lokr_factors, loha_factors, lora_factors
from .keys import parse_key, refused_format
from .names import ModuleIndex, flat

COMPONENT_NAMES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_DENOISERS = ("unet", "transformer")  # a file's denoiser keys go to whichever of the two the model has
_FAMILY_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


@dataclass
class ConvertedLora:
    """A LoRA file as exact low-rank factors per model component and layer."""

    path: Path
    kinds: tuple[str, ...]
    layers: dict[str, dict[str, LowRankDelta]] = field(default_factory=dict)

    def peft_state_dict(self, component: str) -> dict[str, torch.Tensor]:
        """``<module>.lora_A.weight`` / ``.lora_B.weight`` tensors of one component, PEFT naming."""
        state: dict[str, torch.Tensor] = {}
        for module, delta in self.layers.get(component, {}).items():
            state[f"{module}.lora_A.weight"] = delta.down.contiguous()
            state[f"{module}.lora_B.weight"] = delta.up.contiguous()
        return state

    def lora_config(self, component: str) -> dict[str, Any]:
        """``LoraConfig`` arguments reproducing every layer's rank and alpha exactly."""
        layers = self.layers.get(component, {})
        first = next(iter(layers.values()))
        return {
            "r": first.rank,
            "lora_alpha": first.alpha,
            "rank_pattern": {f"^{module}": delta.rank for module, delta in layers.items()},
            "alpha_pattern": {f"^{module}": delta.alpha for module, delta in layers.items()},
            "target_modules": sorted(layers),
        }


def read_lora_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors LoRA file (UserError naming the file if unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"LoRA file {path} cannot be read ({first_line(error)}); re-download it") from None
    check_finite_tensors(tensors, f"LoRA file {path}")  # NaN/Inf never reach a layer
    return tensors, metadata


def convert_lora(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 components: Mapping[str, nn.Module]) -> ConvertedLora:
    """Convert a LoRA file's tensors to exact LoRA factors for the given model components.

    Args:
        path: the file (named in every error).
        tensors, metadata: its contents.
        components: the model's ``unet`` or ``transformer`` and its text encoders (those present).

    Raises:
        UserError: one line naming the file and the reason (a refused format, an unknown key, a LoRA
            made for another model family, a layer the model lacks, factors that do not fit it).
    """
    groups = _on_denoiser(path, _group_keys(path, tensors), components)
    indexes = {name: ModuleIndex.of(module) for name, module in components.items()}
    alphas = _metadata_alphas(metadata)
    converted = ConvertedLora(path, ())
    kinds: set[str] = set()
    for (component, spelling), parts in groups.items():
        module, weight, split = _resolve(path, component, spelling, indexes)
        delta, kind_names = _layer_delta(path, module, parts, weight, alphas.get(component))
        kinds |= kind_names
        layers = converted.layers.setdefault(component, {})
        for target, target_delta in _split_delta(module, delta, split).items():
            if target in layers:
                raise UserError(f"LoRA file {path} has two sets of weights for layer {target} of the {component} "
                                f"(one of them {spelling!r}); use a file with one set per layer")
            layers[target] = target_delta
    converted.kinds = tuple(sorted(kinds))
    return converted


def _on_denoiser(path: Path, groups: dict[tuple[str, str], dict[str, Any]],
                 components: Mapping[str, nn.Module]) -> dict[tuple[str, str], dict[str, Any]]:
    """The groups with their denoiser keys (``unet``/``transformer``) on the model's denoiser and ComfyUI's
    T5 keys on its T5 encoder, after refusing a file whose layer names belong to another model family
    (before any layer is resolved)."""
    denoiser = next((name for name in _DENOISERS if name in components), None)
    family = model_family(components[denoiser]) if denoiser else None
    t5 = next((name for name, model in components.items() if type(model).__name__.startswith("T5")), "t5")
    moved: dict[tuple[str, str], dict[str, Any]] = {}
    for (component, spelling), parts in groups.items():
        if component == "t5":
            component = t5
        elif component in _DENOISERS and denoiser is not None:
            file_family = spelling_family(flat(spelling)) or (DIT if component == "transformer" else None)
            if file_family and family and not fits_family(file_family, family):
                raise UserError(f"LoRA file {path} is made for {FAMILY_NAMES[file_family]} (key "
                                f"{parts['keys'][0]!r}) but the model is {FAMILY_NAMES[family]}; use a LoRA "
                                "trained for this base model")
            component = denoiser
        if (component, spelling) in moved:
            raise UserError(f"LoRA file {path} has weights for layer {spelling!r} under two prefixes (key "
                            f"{parts['keys'][0]!r}); use a file with one set per layer")
        moved[(component, spelling)] = parts
    return moved


def _split_delta(module: str, delta: LowRankDelta, split: RowSplit | None) -> dict[str, LowRankDelta]:
    """The layer's delta, or for a fused reference layer each diffusers layer's rows of it (same down
    factor and scale: exact)."""
    if split is None:
        return {module: delta}
    return {target: LowRankDelta(delta.down, up, delta.alpha) for target, up in split.split_rows(delta.up).items()}


def _group_keys(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, Any]]:
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    for key in tensors:  # first, so a refused format is named whatever the key order ((IA)^3's '.weight')
        refused = refused_format(key)
        if refused:
            raise UserError(f"LoRA file {path} is in the {refused} format (key {key!r}), which loracompose does "
                            "not load; use a LoRA, LoCon, LoHa, LoKr or DoRA file")
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            raise UserError(f"LoRA file {path} has a key in no format loracompose knows ({key!r}); it loads "
                            "diffusers/PEFT, kohya and LyCORIS LoRA, LoCon, LoHa, LoKr and DoRA files")
        parts = groups[(parsed.component, parsed.module)]
        parts.setdefault("families", set()).add(parsed.family)
        parts[parsed.part] = tensor
        parts.setdefault("keys", []).append(key)
    return groups


def _resolve(path: Path, component: str, spelling: str,
             indexes: Mapping[str, ModuleIndex]) -> tuple[str, torch.Tensor, RowSplit | None]:
    """(module name, its weight, None), or for a fused FLUX/SD3 reference layer (its name, the weight
    assembled from its diffusers layers, its row split)."""
    index = indexes.get(component)
    if index is None:
        raise UserError(f"LoRA file {path} has weights for a {component} this model does not have "
                        f"(layer {spelling!r}); use a LoRA made for this base model")
    module = index.resolve(spelling)
    if module is not None:
        return module, cast(torch.Tensor, index.layers[module].weight), None
    split = index.resolve_split(spelling)
    if split is not None:
        return spelling, split.fused_weight(index.layers), split
    raise UserError(f"LoRA file {path} adapts layer {spelling!r} of the {component}, which this model does "
                    "not have; use a LoRA made for this base model")


def _layer_delta(path: Path, module: str, parts: dict[str, Any], weight: torch.Tensor,
                 metadata_alpha: Any) -> tuple[LowRankDelta, set[str]]:
    families = parts["families"] - {"any", "dora"}
    if len(families) != 1:
        found = ", ".join(sorted(_FAMILY_NAMES.get(f, f) for f in families)) or "only alpha/DoRA scale"
        raise UserError(f"LoRA file {path} has {found} weights for layer {module}; "
                        "each layer needs exactly one LoRA, LoHa or LoKr set of weights")
    family = families.pop()
    alpha = _alpha(parts, module, metadata_alpha)
    try:
        delta = _family_delta(family, parts, alpha, weight.shape)
        delta = fit_to_layer(delta, weight.shape)
        _check_shape(delta, weight.shape)
    except (KeyError, RuntimeError, ValueError, IndexError) as error:
        reason = f"missing {error}" if isinstance(error, KeyError) else first_line(error)
        raise UserError(f"LoRA file {path} does not fit layer {module} of this model "
                        f"(weight {tuple(weight.shape)}; {reason}); use a LoRA made for this base model") from None
    kinds = {_FAMILY_NAMES[family] if not (family == "lora" and weight.ndim == 4 and weight.shape[-1] > 1)
             else "LoCon"}
    if "magnitude" in parts:
        kinds.add("DoRA")
        delta = full_rank(dora_delta(delta.delta(), weight.detach(), parts["magnitude"]))
    return delta, kinds


def _family_delta(family: str, parts: dict[str, Any], alpha: float | None, shape: torch.Size) -> LowRankDelta:
    if family == "lora":
        return lora_factors(parts["down"], parts["up"], parts.get("mid"), alpha)
    if family == "loha":
        return loha_factors(parts["w1_a"], parts["w1_b"], parts["w2_a"], parts["w2_b"], parts.get("t1"),
                            parts.get("t2"), alpha, shape)
    return lokr_factors({key: value for key, value in parts.items() if key.startswith("lokr_")}, alpha)


def _check_shape(delta: LowRankDelta, shape: torch.Size) -> None:
    if delta.up.shape[0] != shape[0] or tuple(delta.down.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"factors give {(delta.up.shape[0], *delta.down.shape[1:])}")


def _alpha(parts: Mapping[str, Any], module: str, metadata_alpha: Any) -> float | None:
    """The layer's alpha: its ``.alpha`` tensor, else the adapter config in the metadata, else None."""
    if "alpha" in parts:
        return float(parts["alpha"].float().item())
    if callable(metadata_alpha):
        return metadata_alpha(module)
    return None


def _metadata_alphas(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Per component, a function from module name to alpha, from diffusers' ``lora_adapter_metadata``.

    diffusers/PEFT files carry alpha in their adapter config; without one, alpha equals the rank.
    """
    from peft.utils.other import get_pattern_key

    raw = metadata.get("lora_adapter_metadata")
    try:
        config = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        config = {}
    per_component: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in config.items():
        component, _, field_name = key.rpartition(".")
        per_component[component][field_name] = value
    alphas: dict[str, Any] = {}
    for component, fields in per_component.items():
        if "lora_alpha" not in fields:
            continue

        def alpha_of(module: str, fields: dict[str, Any] = fields) -> float:
            pattern = fields.get("alpha_pattern") or {}
            key = get_pattern_key(list(pattern), module)
            return float(pattern.get(key, fields["lora_alpha"]))

        alphas[component] = alpha_of
    return alphas


def load_lora_file(pipe: Any, path: Path, adapter_name: str, text_encoder_scale: float = 1.0,
                   block_weights: Mapping[str, Any] | None = None) -> ConvertedLora:
    """Convert ``path`` for ``pipe`` and load it as the PEFT adapter ``adapter_name`` on every component.

    ``text_encoder_scale`` multiplies the text encoders' deltas (their strength relative to the UNet's);
    ``block_weights`` (diffusers' ``set_adapters`` dict form) multiplies each layer's delta by its block's value.
    """
    tensors, metadata = read_lora_tensors(path)
    components = {name: getattr(pipe, name) for name in COMPONENT_NAMES if getattr(pipe, name, None) is not None}
    converted = convert_lora(path, tensors, metadata, components)
    for component, layers in converted.layers.items():
        factors = dict.fromkeys(layers, 1.0 if component == "unet" else text_encoder_scale)
        if block_weights is not None:
            from .block_weights import layer_factors

            blocks = layer_factors(block_weights, component, list(layers), components.get("unet"), f"LoRA {path}")
            factors = {module: factors[module] * blocks[module] for module in layers}
        for module, delta in layers.items():
            delta.alpha *= factors[module]
    for component in converted.layers:
        state, config = converted.peft_state_dict(component), converted.lora_config(component)
        if component in _DENOISERS:
            # diffusers' own PEFT entry point of the UNet / transformer (what load_lora_into_unet and
            # FluxLoraLoaderMixin / SD3LoraLoaderMixin.load_lora_into_transformer call)
            components[component].load_lora_adapter(
                {f"{component}.{key}": value for key, value in state.items()}, prefix=component,
                adapter_name=adapter_name, _pipeline=pipe,
                metadata={f"{component}.{key}": value for key, value in config.items()})
        else:
            # transformers' own PEFT entry point: diffusers' text-encoder loader re-converts the keys and
            # handles the attention projections only (not an MLP-only adapter).
            from peft import LoraConfig

            encoder = components[component]
            encoder.load_adapter(adapter_name=adapter_name, adapter_state_dict=state, peft_config=LoraConfig(**config))
            encoder.to(device=encoder.device, dtype=encoder.dtype)
    return converted
