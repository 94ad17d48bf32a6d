"""Oracles shared by the test modules: stock diffusers pipelines, an independent UNet call count, a lexical
text embedder with known behaviour, LoRA file copies with edited metadata, the one-line error check, the
tiny FLUX/SD3 folders with two LoRAs, and CMLoRA's cache probe and uncached reference."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.errors import UserError
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod
from loracompose.methods.cmlora import predict_keeping_deep_features, predict_shallow
from loracompose.methods.composite import Composite
from loracompose.methods.merge import Merge
from loracompose.pipelines import load_pipeline
from loracompose.pipelines.values import Prediction

# A library of twelve LoRAs for retrieval: one subject each, captions from the training templates;
# held-out prompts use the other templates.
SUBJECTS = ("red fox", "blue whale", "golden retriever", "snowy mountain", "neon city", "oil painting", "pixel art",
            "medieval castle", "cherry blossom", "desert dunes", "robot knight", "white cat")
CATEGORIES = ("character", "style", "background", "object")
TRAINING_TEMPLATES = ("{}", "a photo of a {}", "{}, detailed illustration")
HELD_OUT_TEMPLATES = ("a {} standing in the rain", "portrait of a {} at sunset")

# The request of the "next Merge equals a fresh pipeline's" oracle (conftest's fresh_merge): the two tiny
# SD1.5 LoRAs' triggers, 2 steps, latents out.
ORACLE_PROMPT = "a zkx cat and a qwv dog"
ORACLE_SETTINGS = dict(steps=2, guidance_scale=6.0, width=64, height=64, output_type="latent", show_progress=False,
                       seed=5)


def plain_diffusers(model_dir: Path, sdxl: bool) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The stock diffusers pipeline of a model folder, with DPM-Solver++ (loracompose's default sampler)."""
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(model_dir, **extra)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UNetCallCounter:
    """An independent count of UNet forwards and the rows they evaluate (and the adapters active at
    each call), via a forward pre-hook."""

    def __init__(self, unet: torch.nn.Module):
        self.calls, self.rows, self.active = 0, 0, []
        self.handle = unet.register_forward_pre_hook(self.count)

    def count(self, unet: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]
        probe = next((m for m in unet.modules() if hasattr(m, "lora_A") and len(m.lora_A)), None)
        self.active.append(tuple(probe.active_adapters) if probe is not None else ())

    def close(self) -> None:
        self.handle.remove()


def with_metadata(source: Path, out: Path, extra: dict[str, str] | None = None, zero=lambda key: False) -> Path:
    """A copy of a LoRA file with extra metadata and the lora_B weights of keys where ``zero(key)`` zeroed."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = {key: torch.zeros_like(value) if "lora_B" in key and zero(key) else value
               for key, value in load_file(source).items()}
    save_file(tensors, str(out), metadata=metadata | (extra or {}))
    return out


DIT_FAMILIES = ("flux", "sd3")  # the families of tiny_dits_with_two_loras, in test-id order


@dataclass
class UNetOnlyMerge(Merge):
    """Merge that keeps the base class's families (SD1.5, SDXL), as a method not ported to DiTs does;
    written for the refusal tests, since every registered method now runs on FLUX and SD3."""

    name: ClassVar[str] = "unet-only-merge"
    families: ClassVar[frozenset[str]] = CompositionMethod.families


def tiny_dits_with_two_loras(tmp_path_factory: pytest.TempPathFactory,
                             transformers: dict[str, dict[str, Any]] | None = None,
                             ) -> dict[str, tuple[Path, Any, list[Path]]]:
    """Tiny FLUX and SD3 folders (seed 0), each loaded back through ``load_pipeline`` on the CPU, with two
    LoRAs made for it: ``character`` (trigger "zkx", seed 1) and ``other`` ("qwv", seed 2).
    ``transformers``: per family, transformer config overrides. Returns {family: (model folder, pipeline,
    [LoRA files])}."""
    made = {}
    for name, build in (("flux", build_tiny_flux), ("sd3", build_tiny_sd3)):
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        model = build(root / "model", seed=0, transformer=(transformers or {}).get(name))
        loras = [build_tiny_lora(model, root / f"{stem}.safetensors", seed=seed, trigger_words=[trigger],
                                 init_scale=2.0)
                 for stem, trigger, seed in (("character", "zkx", 1), ("other", "qwv", 2))]
        made[name] = (model, load_pipeline(model, device="cpu"), loras)
    return made


def dit_rows_per_image(family: str) -> int:
    """Transformer rows per image and branch: FLUX is guidance-distilled (no CFG halves), SD3 runs CFG."""
    return 1 if family == "flux" else 2


def max_prediction_difference(first: Sequence[Any], second: Sequence[Any]) -> float:
    """The largest absolute difference between two lists of Predictions, over both CFG halves (where present)."""
    def halves(prediction: Any) -> list[torch.Tensor]:
        return [prediction.cond] + ([] if prediction.uncond is None else [prediction.uncond])

    return max((a - b).abs().max().item() for p, q in zip(first, second) for a, b in zip(halves(p), halves(q)))


@dataclass
class ShallowProbe(CompositionMethod):
    """CMLoRA's cache oracle as a method. At every step: full passes keeping the deep features, plain
    passes, then shallow passes around the fresh caches and around the previous step's; records the
    largest differences (shallow vs full: rounding; full vs plain: zero; stale vs full: not small)."""

    name: ClassVar[str] = "probe"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    batched: bool = True
    shallow_vs_full: list = field(default_factory=list)
    full_vs_plain: list = field(default_factory=list)
    stale_vs_full: list = field(default_factory=list)

    def start(self, run):
        self.previous = None

    def predict(self, run, step, latents):
        branches = [self.branch(lora) for lora in self.loras]
        full, caches = predict_keeping_deep_features(run, latents, step, branches, batch=self.batched)
        plain = run.predict(latents, step, branches, batch=self.batched)
        shallow = predict_shallow(run, latents, step, branches, caches, batch=self.batched)
        self.shallow_vs_full.append(max_prediction_difference(shallow, full))
        self.full_vs_plain.append(max_prediction_difference(full, plain))
        if self.previous is not None:
            stale = predict_shallow(run, latents, step, branches, self.previous, batch=self.batched)
            self.stale_vs_full.append(max_prediction_difference(stale, full))
        self.previous = caches
        return Prediction.mix(full)


@dataclass
class StepWeightedComposite(Composite):
    """Composite whose mixing weights change per step: CMLoRA without its cache (the uncached reference)."""

    name: ClassVar[str] = "step-weighted-composite"
    weights_per_step: tuple = ()

    def predict(self, run, step, latents):
        self.mixing_weights = self.weights_per_step[step.index]
        return super().predict(run, step, latents)


class BagOfTokensEmbedder:
    """A lexical text embedder with known behaviour: the sum of fixed random vectors of a text's distinct
    CLIP tokens. Texts sharing words are close, so held-out prompts are answerable from the text side and
    the test measures what the weight encoder learned (the tiny model's random CLIP has no semantics)."""

    fingerprint = "bag-of-tokens-64"

    def __init__(self, tokenizer, dim: int = 64) -> None:
        self.tokenizer = tokenizer
        self.table = torch.randn(len(tokenizer), dim, generator=torch.Generator().manual_seed(0))

    def embed(self, texts):
        ids = [sorted(set(self.tokenizer(text, add_special_tokens=False).input_ids)) for text in texts]
        return torch.stack([self.table[row].sum(0) for row in ids])


def assert_one_line_user_errors(cases: Sequence[tuple[Callable[[], Any], str]]) -> None:
    """Each call raises a :class:`UserError` matching its pattern, in one line."""
    for call, match in cases:
        with pytest.raises(UserError, match=match) as caught:
            call()
        assert "\n" not in str(caught.value)


@contextmanager
def serve_tiny_ui(model: Path | None = None, library: Path | None = None) -> Iterator[tuple[Any, Any, Any, str]]:
    """``loracompose ui`` with no model on the embedded tiny SD1.5 variant and its demo LoRAs (or
    ``loracompose ui --model MODEL --library LIBRARY``), served on a free local port: yields (app, blocks,
    settings, url) and closes the server afterwards."""
    from loracompose.ui import UiOptions, resolve_settings
    from loracompose.ui.app import LoraComposeApp, launch_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORACOMPOSE_EMBEDDED", "tiny-sd15")
        options = UiOptions() if model is None else UiOptions(model=str(model), library=library)
        model, settings = resolve_settings(options)
    app = LoraComposeApp(load_pipeline(model), settings)
    blocks = app.build()
    port = free_port()
    launch_app(blocks, settings, host="127.0.0.1", port=port, block=False, quiet=True)
    try:
        yield app, blocks, settings, f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
