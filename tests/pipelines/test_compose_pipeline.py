"""generate() (pipelines/compose_pipeline.py) drives a method's hooks in order: bind, prepare, the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from loracompose import LoraSpec, Merge


@dataclass
class RecordingMerge(Merge):
    """Merge that logs its hooks and what they were given."""

    name: ClassVar[str] = "recording-merge"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.log: list[tuple] = []

    def bind(self, loras):
        super().bind(loras)
        self.log.append(("bind", tuple(lora.name for lora in loras)))

    def prepare(self, pipe, loras):
        self.log.append(("prepare", pipe, tuple(lora.name for lora in loras)))

    def start(self, run):
        self.log.append(("start",))
        super().start(run)

    def finish(self, run):
        self.log.append(("finish",))


def test_generate_calls_bind_then_prepare_with_the_pipeline_then_the_loop(sd15, sd15_lora_files):
    method = RecordingMerge()
    sd15.generate("a cat", [LoraSpec(path) for path in sd15_lora_files], method, steps=1, output_type="latent",
                  show_progress=False)
    names = tuple(path.stem for path in sd15_lora_files)
    assert method.log == [("bind", names), ("prepare", sd15, names), ("start",), ("finish",)]
