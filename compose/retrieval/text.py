"""Pooled text embeddings for retrieval: the base model's own text encoder(s), or open_clip's text tower."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from loracompose.errors import UserError, first_line
from loracompose.provenance import model_identity, portable_name


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
        # Written into trained retriever files: the model's name and weights digest, never its folder.
        source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
        identity = model_identity(source, pipe)
        self.fingerprint = f"pipeline-eos:{identity['name']}@{identity['digest']}"

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

    ``pretrained`` is a tag (needs the hub) or a local weights file; offline, use a
    file or a ``local-dir:`` model name.
    """

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> None:
        import open_clip

        try:
            self.model = open_clip.create_model(model_name, pretrained=pretrained, device=device).eval()
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, ValueError, OSError) as error:
            raise UserError(f"open_clip model {model_name!r} ({pretrained or 'random weights'}) cannot be loaded "
                            f"({first_line(error)}); give a known model name and a local weights file") from None
        self.device = torch.device(device)
        self.fingerprint = f"open_clip:{portable_name(model_name)}:{portable_name(pretrained or 'random')}"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()
