"""CLIP BPE tokenizer (open_clip's `SimpleTokenizer` with its bundled vocabulary)."""

from __future__ import annotations

import logging
import re
from functools import cached_property

import torch
from open_clip.tokenizer import SimpleTokenizer, basic_clean

# open_clip's pre-tokenizer turns these strings into the start and end ids wherever a text holds them
SPECIAL_TEXT = re.compile(r"<start_of_text>|<end_of_text>", re.IGNORECASE)
MAX_CLEANING_ROUNDS = 8  # each round unescapes at least one level of HTML; captions hold one or two

# CLIP's pre-tokenizer makes each digit, each run of punctuation and each of the contractions 's 't 're 've 'm
# 'll 'd a word of its own, and its decoding puts a space after every word. These undo the splits that decoded
# text can tell apart. A digit before letters cannot be told from a number before a word ("3d" decodes as "3 d",
# like "2 men"), so it stays apart; two numbers in a row ("2 3") join into one, as do "2 . 5" and "10 : 30";
# a spaced hyphen ("well - known") closes up.
REJOINS = (
    (re.compile(r"(?<=\d) (?=\d)"), ""),  # "2 0 1 5" -> "2015"
    (re.compile(r"(?<=\d) ([.:]) (?=\d)"), r"\1"),  # "2 . 5" -> "2.5", "1 0 : 3 0" -> "10:30" (digits first)
    (re.compile(r"(?<=\w) '(s|t|re|ve|m|ll|d)(?= |$)"), r"'\1"),  # "isn 't" -> "isn't"
    (re.compile(r"(?<=\w) - (?=\w)"), "-"),  # "t - shirt" -> "t-shirt"
)

log = logging.getLogger(__name__)


def rejoin_words(text: str) -> str:
    """`text` (decoded, one space between words) with digit runs, hyphenated words and contractions closed up."""
    for pattern, joined in REJOINS:
        text = pattern.sub(joined, text)
    return text


def plain_text(text: str) -> str:
    """`text` cleaned as open_clip cleans it (ftfy, then HTML entities unescaped) and without the literal
    strings of CLIP's special tokens: in a caption, "<end_of_text>" would end it there (the rest masked
    out) and "<start_of_text>" start it again, also when written "&lt;end_of_text&gt;". Cleaned until
    nothing changes, so that the tokenizer's own cleaning of the result unescapes no hidden one."""
    for _ in range(MAX_CLEANING_ROUNDS):
        cleaned = SPECIAL_TEXT.sub(" ", basic_clean(text))
        if cleaned == text:
            break
        text = cleaned
    return text


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
        (CLIP's vocabulary has tokens for "\\r", "\\x0b" and "\\x0c") one space and the words CLIP
        splits apart rejoined where the text tells (`rejoin_words`)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = []
        for token in ids:
            if token == self.eot_id:
                break
            if token != self.sot_id:
                words.append(token)
        return rejoin_words(" ".join(self.bpe.decode(words).split()))


def require_text(text: str, what: str, tokenizer: Tokenizer) -> None:
    """ValueError when `text` has no word for the tokenizer (blank, or only characters it drops, such as
    a byte-order mark or control characters): it would run as an empty query, question or caption; a
    warning when it has more than fit `tokenizer.length` with the start and end tokens (the rest is cut
    off, so the model never sees it)."""
    words = len(tokenizer.encode_words(text))
    if not words:
        raise ValueError(f"the {what} is empty (no word the tokenizer keeps)")
    dropped = words - (tokenizer.length - 2)
    if dropped > 0:
        log.warning("the %s has %d tokens, more than the %d that model.text_len=%d leaves beside the start and "
                    "end tokens: its last %d are cut off", what, words, tokenizer.length - 2, tokenizer.length, dropped)
