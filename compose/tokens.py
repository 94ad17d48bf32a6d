"""Where words sit in a tokenised prompt: trigger-token positions and 0/1 token masks.

TARA (docs/methods/tara.md) routes each LoRA through the text tokens of its rare/trigger word. A word's
positions are found the reference's way, on token ids rather than on text::

    word_ids   <- tokenizer(" " + word, no special tokens)          # 1 or more BPE tokens
    prompt_ids <- tokenizer(prompt, padded and truncated to 77)     # as the pipeline encodes it
    positions  <- every start s where prompt_ids[s : s + len(word_ids)] == word_ids
                  and prompt_ids[s] begins a word                   # "kx" does not match inside "zkx"
    mask       <- 1 at every token of every match, 0 elsewhere      # SDXL: OR over both tokenizers

A word cut off by the 77-token limit is absent. CLIP's BPE ends each word's last token with
``</w>``, so a match always ends on a word boundary; the start is checked against the previous
token, which must be the start-of-text token or end a word itself. T5's SentencePiece tokens (FLUX,
SD3) mark a word's first token with ``▁`` instead: a match starts there and must be followed by a
special token, a word start or a token that does not begin with a letter or digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from loracompose.errors import UserError

if TYPE_CHECKING:
    import torch

WORD_END = "</w>"
WORD_START = "\u2581"  # SentencePiece's word-start mark (T5)


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """The BPE ids of ``word`` alone (no start/end tokens); several for multi-token words."""
    if not word.strip():
        raise UserError("a trigger word is empty; give each LoRA a non-empty trigger word")
    ids = tokenizer(" " + word.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"trigger word {word!r} tokenises to nothing; use a word made of letters or digits")
    return list(ids)


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids exactly as the pipeline encodes it: padded and truncated to the model length."""
    return list(tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True).input_ids)


def word_positions(tokenizer: Any, prompt_ids: Sequence[int], word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` in the prompt's ids (all of its BPE tokens)."""
    pieces = word_token_ids(tokenizer, word)
    special = set(tokenizer.all_special_ids)
    positions: list[int] = []
    for start in _match_starts(prompt_ids, pieces):
        if _is_sentencepiece_word(tokenizer, pieces):
            if not _ends_sentencepiece_word(tokenizer, prompt_ids, start + len(pieces), special):
                continue
            positions.extend(range(start, start + len(pieces)))
        elif _starts_word(tokenizer, prompt_ids, start, special):
            positions.extend(range(start, start + len(pieces)))
    return positions


def _match_starts(ids: Sequence[int], pieces: Sequence[int]) -> list[int]:
    """Starts of the non-overlapping occurrences of ``pieces`` in ``ids``, left to right."""
    starts, start, width = [], 0, len(pieces)
    while start + width <= len(ids):
        if list(ids[start:start + width]) == list(pieces):
            starts.append(start)
            start += width
        else:
            start += 1
    return starts


def _is_sentencepiece_word(tokenizer: Any, pieces: Sequence[int]) -> bool:
    """Whether the word's tokens carry SentencePiece's word-start mark (T5), not CLIP's word end."""
    return str(tokenizer.convert_ids_to_tokens(pieces[0])).startswith(WORD_START)


def _ends_sentencepiece_word(tokenizer: Any, ids: Sequence[int], after: int, special: set[int]) -> bool:
    """Whether a SentencePiece match ending before ``after`` ends a word ("zkx" does not match in "zkxy")."""
    if after >= len(ids) or ids[after] in special:
        return True
    following = str(tokenizer.convert_ids_to_tokens(ids[after]))
    return following.startswith(WORD_START) or not following[:1].isalnum()


def _starts_word(tokenizer: Any, ids: Sequence[int], start: int, special: set[int]) -> bool:
    """Whether the token at ``start`` begins a word: the previous token is special or ends a word."""
    if start == 0 or ids[start - 1] in special:
        return True
    return tokenizer.convert_ids_to_tokens(ids[start - 1]).endswith(WORD_END)


@dataclass(frozen=True)
class WordPositions:
    """Token positions of a LoRA's trigger words in one prompt, per tokenizer, and what was not found."""

    per_tokenizer: tuple[tuple[int, ...], ...]
    missing_words: tuple[str, ...]
    length: int

    @property
    def positions(self) -> list[int]:
        """Positions found by any tokenizer (SDXL: the OR of both), sorted."""
        return sorted({p for found in self.per_tokenizer for p in found})

    @property
    def found(self) -> bool:
        return bool(self.positions)

    def mask(self) -> torch.Tensor:
        """A (length,) float 0/1 mask: 1 at :attr:`positions`."""
        import torch

        mask = torch.zeros(self.length)
        mask[self.positions] = 1.0
        return mask


def trigger_positions(tokenizers: Sequence[Any], prompt: str, words: Sequence[str]) -> WordPositions:
    """Positions of all ``words`` in ``prompt`` under each tokenizer (SD1.5: one, SDXL: two)."""
    if not tokenizers:
        raise UserError("no tokenizer given; trigger positions need the pipeline's tokenizer(s)")
    lengths = {int(tokenizer.model_max_length) for tokenizer in tokenizers}
    if len(lengths) != 1:
        raise UserError(f"the tokenizers pad to different lengths {sorted(lengths)}; use a pipeline whose "
                        "tokenizers share one length")
    prompt_ids = [prompt_token_ids(tokenizer, prompt) for tokenizer in tokenizers]
    found = {word: [word_positions(tok, ids, word) for tok, ids in zip(tokenizers, prompt_ids)] for word in words}
    per_tokenizer = tuple(
        tuple(sorted({p for word in words for p in found[word][index]})) for index in range(len(tokenizers))
    )
    missing = tuple(word for word in words if not any(found[word]))
    return WordPositions(per_tokenizer, missing, lengths.pop())


def pipeline_tokenizers(pipe: Any) -> list[Any]:
    """The tokenizers of an SD1.5 (one) or SDXL (two) pipeline, skipping absent ones."""
    return [tok for tok in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if tok is not None]


# --- DiT text streams (FLUX.1: T5; SD3: CLIP-L/G then T5) --------------------------------------------


def stream_trigger_positions(streams: Sequence[tuple[Sequence[Any], int]], prompt: str,
                             words: Sequence[str]) -> WordPositions:
    """Positions of ``words`` in a DiT's joint text sequence, made of consecutive streams.

    Each stream is (tokenizers side by side, its token count): FLUX.1 ``[([T5], L)]``; SD3
    ``[([CLIP-L, CLIP-G], 77), ([T5], L)]``. Each tokenizer encodes the prompt as the pipeline does
    (padded and truncated to the stream's length); a stream's positions are offset by the lengths of
    the streams before it, so they index the text tokens the transformer attends to.
    """
    if not streams or not all(tokenizers for tokenizers, _ in streams):
        raise UserError("no tokenizer given; trigger positions need the pipeline's tokenizer(s)")
    per_tokenizer: list[tuple[int, ...]] = []
    found_any = dict.fromkeys(words, False)
    offset = 0
    for tokenizers, length in streams:
        for tokenizer in tokenizers:
            ids = list(tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids)
            positions: set[int] = set()
            for word in words:
                hits = word_positions(tokenizer, ids, word)
                found_any[word] = found_any[word] or bool(hits)
                positions.update(offset + position for position in hits)
            per_tokenizer.append(tuple(sorted(positions)))
        offset += length
    missing = tuple(word for word in words if not found_any[word])
    return WordPositions(tuple(per_tokenizer), missing, offset)
