"""The Denoiser on the tiny SD1.5 model (pipelines/denoiser.py): batched passes equal one pass per
branch, UNet calls and rows are exact (against an independent hook), custom passes see the same
batching, and its patch stack leaves no LoRA active."""

from __future__ import annotations

import pytest
import torch

from helpers import UNetCallCounter
from loracompose import LoraSpec, load_pipeline
from loracompose.pipelines.adapters import AdapterController
from loracompose.pipelines.denoiser import BranchBatch, Denoiser
from loracompose.pipelines.schedulers import DEFAULT_SCHEDULER, make_scheduler
from loracompose.pipelines.values import BASE, Branch, Conditioning

PROMPT = "a zkx cat in qwv style"
NUM_IMAGES = 2
# Batched and per-branch calls run the same arithmetic on differently shaped batches: float32 rounding.
BATCHED_ATOL = 1e-5


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir, sd15_lora_files):
    pipe = load_pipeline(tiny_sd15_dir)
    pipe.prepare_loras([LoraSpec(path) for path in sd15_lora_files])  # adapters "character" and "style"
    return pipe


def make_denoiser(pipe, guidance: float = 6.0, **options) -> Denoiser:
    scheduler = make_scheduler(DEFAULT_SCHEDULER, pipe.scheduler.config)
    scheduler.set_timesteps(2)
    adapters = AdapterController({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    do_cfg = guidance > 1.0

    def encode(branch: Branch) -> Conditioning:
        adapters.activate(branch.weights, components=["text_encoder"])
        with torch.no_grad():
            positive, negative = pipe.encode_prompt(branch.prompt or PROMPT, "cpu", NUM_IMAGES, do_cfg)
        return Conditioning(torch.cat([negative, positive]) if do_cfg else positive)

    return Denoiser(unet=pipe.unet, scheduler=scheduler, timesteps=scheduler.timesteps, encode=encode,
                    adapters=adapters, guidance_scale=guidance, do_cfg=do_cfg, batch_size=NUM_IMAGES,
                    extra_step_kwargs={}, **options)


BRANCHES = [Branch.of({"character": 0.8}), Branch.of({"style": 1.0}), BASE]


def latents_for(run: Denoiser) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(NUM_IMAGES, 4, 32, 32, generator=generator) * run.scheduler.init_noise_sigma


def counted(pipe, call):
    counter = UNetCallCounter(pipe.unet)
    try:
        with torch.no_grad():
            result = call()
    finally:
        counter.close()
    return result, (counter.calls, counter.rows)


@pytest.mark.parametrize("guidance", [6.0, 1.0])
def test_batched_equals_one_call_per_branch_with_exact_counts(pipe, guidance):
    batched_run, sequential_run = make_denoiser(pipe, guidance), make_denoiser(pipe, guidance, allow_batching=False)
    step = next(batched_run.steps())
    latents = latents_for(batched_run)
    batched, batched_counts = counted(pipe, lambda: batched_run.predict(latents, step, BRANCHES))
    sequential, sequential_counts = counted(pipe, lambda: sequential_run.predict(latents, step, BRANCHES))
    rows = batched_run.num_halves * len(BRANCHES) * NUM_IMAGES
    assert batched_counts == (1, rows) and sequential_counts == (len(BRANCHES), rows)
    for run, counts in ((batched_run, batched_counts), (sequential_run, sequential_counts)):
        assert (run.stats.unet_calls, run.stats.unet_rows) == counts
    assert (batched_run.stats.execution, sequential_run.stats.execution) == ("batched", "sequential")
    for one, other in zip(batched, sequential):
        torch.testing.assert_close(one.cond, other.cond, atol=BATCHED_ATOL, rtol=0)
        assert (one.uncond is None) == (guidance == 1.0) == (other.uncond is None)
        if one.uncond is not None:
            torch.testing.assert_close(one.uncond, other.uncond, atol=BATCHED_ATOL, rtol=0)
    assert (batched[0].cond - batched[1].cond).abs().max() > 1e-3, "the branches must differ for this to mean anything"


def test_conditional_rows_alone_at_half_the_rows(pipe):
    run = make_denoiser(pipe)
    step = next(run.steps())
    latents = latents_for(run)
    full = run.predict(latents, step, BRANCHES)
    conditional, counts = counted(pipe, lambda: run.branch_passes(latents, step, BRANCHES, conditional_only=True))
    assert counts == (1, len(BRANCHES) * NUM_IMAGES)
    for rows, prediction in zip(conditional, full):
        torch.testing.assert_close(rows, prediction.cond, atol=BATCHED_ATOL, rtol=0)


@pytest.mark.parametrize("allow_batching,expected", [(True, [[0, 1, 2]]), (False, [[0], [1], [2]])])
def test_a_custom_pass_gets_the_same_batching_and_row_layout(pipe, allow_batching, expected):
    run = make_denoiser(pipe, allow_batching=allow_batching)
    step = next(run.steps())
    latents = latents_for(run)
    seen: list[list[int]] = []

    def recording_pass(batch: BranchBatch) -> torch.Tensor:
        seen.append(batch.branches)
        assert batch.sample.shape[0] == batch.conditioning.embeds.shape[0] == 2 * len(batch.branches) * NUM_IMAGES
        return run.unet_pass(batch)

    with torch.no_grad():
        custom = run.predict(latents, step, BRANCHES, unet_pass=recording_pass)
        default = run.predict(latents, step, BRANCHES)
    assert seen == expected
    for one, other in zip(custom, default):
        assert torch.equal(one.cond, other.cond) and torch.equal(one.uncond, other.uncond)


def test_branch_batch_rows_and_split_are_inverse():
    per_branch = [torch.arange(4.0).view(4, 1) + 10 * b for b in range(3)]  # rows [half][image], 2 halves x 2 images
    batch = BranchBatch(torch.zeros(12, 1), torch.tensor(1), Conditioning(torch.zeros(12, 1)), [0, 1, 2], 2)
    rows = batch.rows(per_branch)
    # [half][branch][image]: the unconditional rows of every branch come first
    assert rows.flatten().tolist() == [0, 1, 10, 11, 20, 21, 2, 3, 12, 13, 22, 23]
    assert all(torch.equal(a, b) for a, b in zip(batch.split(rows), per_branch))


def test_why_branches_cannot_share_a_call(pipe):
    run = make_denoiser(pipe, max_batch_rows=8)
    one, two = Branch.of({"character": 1.0}), Branch.of({"style": 1.0})
    assert run.batching_blocked([one, two]) is None  # 2 branches x 2 halves x 2 images = 8 rows
    assert "memory cap" in run.batching_blocked([one, two, BASE])
    assert "one branch" in run.batching_blocked([one])
    assert "several LoRAs" in run.batching_blocked([Branch.of({"character": 1.0, "style": 1.0}), BASE])
    assert "two strengths" in run.batching_blocked([one, Branch.of({"character": 0.5})])
    assert "turned off" in run.batching_blocked([one, two], batch=False)
    assert run.batching_blocked([one, two, BASE], halves=1) is None, "conditional rows alone fit the cap"


def test_its_patch_stack_leaves_no_lora_active(pipe):
    run = make_denoiser(pipe)
    with torch.no_grad():
        run.predict(latents_for(run), next(run.steps()), [Branch.of({"character": 1.0, "style": 1.0})])
    layers = run.adapters.layers["unet"] + run.adapters.layers["text_encoder"]
    assert any(layer.active_adapters for layer in layers)
    run.patches.unwind()
    assert not any(layer.active_adapters for layer in layers)
