"""LoRA training: the shared trainer and its checkpoint/resume settings (TARA, AutoLoRA gates and the
retriever train through it)."""
