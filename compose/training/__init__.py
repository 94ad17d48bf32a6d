"""Training: everything that learns weights (nothing here runs at generation time).

- :mod:`~loracompose.training.trainer`: the shared DreamBooth-style LoRA trainer (``train-lora``).
- :mod:`~loracompose.training.tara`: TARA's objective on top of it (``train-tara``).
- :mod:`~loracompose.training.gates`: AutoLoRA's gates on a LoRA set (``train-gates``).
- :mod:`~loracompose.training.retriever`: the weight-encoding retriever on a library (``train-retriever``).
- :mod:`~loracompose.training.checkpoints`: the one checkpoint settings type, checkpoint folders,
  exact resuming and the step loop, used by all of them and by the toy world's trainer.
- :mod:`~loracompose.training.seeds`: the seeded draws that make resuming exact.
"""
