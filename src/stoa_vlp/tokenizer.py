"""CLIP BPE tokenizer (open_clip's `SimpleTokenizer` with its bundled vocabulary)."""

from __future__ import annotations

import re
from functools import cached_property

import torch
from open_clip.tokenizer import SimpleTokenizer

# open_clip's pre-tokenizer turns these strings into the start and end ids wherever a text holds them
SPECIAL_TEXT = re.compile(r"<start_of_text>|<end_of_text>", re.IGNORECASE)


def plain_text(text: str) -> str:
    """`text` without the literal strings of CLIP's special tokens: in a caption, "<end_of_text>" would
    end it there (the rest masked out) and "<start_of_text>" start it again."""
    return SPECIAL_TEXT.sub(" ", text)


class Tokenizer:
    """Encodes captions to fixed-length CLIP token ids: [SOT, words..., EOT, 0...].

    A caption longer than `length` is cut so that the end token is always kept.
    """

    def __init__(self, length: int = 32):
        self.length = length

    @cached_property
    def bpe(self) -> SimpleTokenizer:
        return SimpleTokenizer(context_length=self.length)

    @property
    def sot_id(self) -> int:
        return self.bpe.sot_token_id

    @property
    def eot_id(self) -> int:
        return self.bpe.eot_token_id

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns token ids (B, L) long and the mask of real tokens (B, L) bool."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.bpe([plain_text(text) for text in texts], context_length=self.length)
        # id 0 is also the word "!", so the mask comes from the end token's position
        end = (tokens == self.eot_id).int().argmax(dim=1, keepdim=True)
        mask = torch.arange(self.length).unsqueeze(0) <= end
        return tokens, mask

    def encode_words(self, text: str) -> list[int]:
        """BPE ids of `text` without start/end tokens and without truncation."""
        return self.bpe.encode(plain_text(text))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of the word tokens in `ids`, stopping at the end token, with each run of whitespace
        (CLIP's vocabulary has tokens for "\\r", "\\x0b" and "\\x0c") one space."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = []
        for token in ids:
            if token == self.eot_id:
                break
            if token != self.sot_id:
                words.append(token)
        return " ".join(self.bpe.decode(words).split())
