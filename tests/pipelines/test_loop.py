"""The denoising loop on its own (pipelines/loop.py): what it calls, in which order, and that
``finish`` and the patch stack run however a generation ends."""

from __future__ import annotations

import pytest
import torch

from loracompose.pipelines.loop import denoise
from loracompose.pipelines.patches import PatchStack
from loracompose.pipelines.values import Prediction, Step

GUIDANCE = 3.0


class FakeRun:
    """The parts of a Denoiser the loop uses; the scheduler step records what it was given."""

    def __init__(self, num_steps: int, log: list) -> None:
        self.patches = PatchStack()
        self.patches.on_unwind(lambda: log.append("unwound"))
        self.guidance_scale = GUIDANCE
        self.num_steps = num_steps
        self.noise: list[torch.Tensor] = []
        self.log = log

    def steps(self):
        for index in range(self.num_steps):
            yield Step(index, torch.tensor(float(index)), self.num_steps)

    def scheduler_step(self, noise, step, latents):
        self.log.append(f"scheduler_step {step.index}")
        self.noise.append(noise)
        return latents - 0.1 * noise


class RecordingMethod:
    """Logs every call; ``fail_in`` names the call (and step) that raises."""

    def __init__(self, log: list, fail_in: str | None = None) -> None:
        self.log, self.fail_in = log, fail_in
        self.grad_in_prepare, self.grad_in_predict = [], []

    def _call(self, name: str, step: Step | None = None) -> None:
        label = name if step is None else f"{name} {step.index}"
        self.log.append(label)
        if label == self.fail_in:
            raise RuntimeError(f"failed in {label}")

    def start(self, run):
        self._call("start")

    def prepare_latents(self, run, step, latents):
        self._call("prepare_latents", step)
        self.grad_in_prepare.append(torch.is_grad_enabled())
        return latents + 1.0

    def predict(self, run, step, latents):
        self._call("predict", step)
        self.grad_in_predict.append(torch.is_grad_enabled())
        return Prediction(cond=latents * 2.0, uncond=latents)

    def end_step(self, run, step, latents):
        self._call("end_step", step)

    def finish(self, run):
        self._call("finish")


def run_loop(num_steps: int = 2, fail_in: str | None = None):
    log: list[str] = []
    run, method = FakeRun(num_steps, log), RecordingMethod(log, fail_in)
    latents = denoise(run, method, torch.ones(1, 4, 2, 2), progress=lambda: log.append("progress"))
    return log, run, method, latents


def test_calls_in_order_then_finish_then_the_patch_stack():
    log, _, _, _ = run_loop(2)
    per_step = ["prepare_latents {i}", "predict {i}", "scheduler_step {i}", "end_step {i}", "progress"]
    expected = ["start", *(entry.format(i=i) for i in range(2) for entry in per_step), "finish", "unwound"]
    assert log == expected


def test_the_scheduler_gets_the_guided_prediction_and_latents_flow_through():
    _, run, method, latents = run_loop(1)
    prepared = torch.ones(1, 4, 2, 2) + 1.0  # prepare_latents adds 1
    guided = prepared + GUIDANCE * (2.0 * prepared - prepared)  # uncond + s (cond - uncond)
    assert torch.equal(run.noise[0], guided)
    assert torch.equal(latents, prepared - 0.1 * guided)
    assert method.grad_in_prepare == [True] and method.grad_in_predict == [False], "predict runs without a graph"


@pytest.mark.parametrize("fail_in", ["start", "prepare_latents 0", "predict 1", "end_step 0"])
def test_a_failing_call_is_followed_by_finish_then_the_patch_stack(fail_in):
    log: list[str] = []
    run, method = FakeRun(2, log), RecordingMethod(log, fail_in)
    with pytest.raises(RuntimeError, match=f"failed in {fail_in}"):
        denoise(run, method, torch.ones(1, 4, 2, 2))
    assert log[log.index(fail_in):] == [fail_in, "finish", "unwound"]


def test_the_patch_stack_unwinds_when_finish_itself_fails():
    log: list[str] = []
    run, method = FakeRun(1, log), RecordingMethod(log, "finish")
    with pytest.raises(RuntimeError, match="failed in finish"):
        denoise(run, method, torch.ones(1, 4, 2, 2))
    assert log[-2:] == ["finish", "unwound"]
