"""Caption metrics equal pycocoevalcap's scorers called directly on a toy set."""

import pytest

from stoa_vlp.metrics.captioning import METRIC_NAMES, CaptionScorer, JavaMissingError, check_java

REFERENCES = {
    "v1": ["a red square moves to the left.", "A red box slides left"],
    "v2": ["a blue circle jumps up and down", "the blue ball bounces"],
    "v3": ["two shapes, a green triangle and a yellow square, move apart", "shapes separate"],
}
PREDICTIONS = {"v1": "a red square moves left", "v2": "a blue ball bounces up", "v3": "a green triangle moves"}


def direct_scores(meteor=None):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    scores = {f"BLEU-{i + 1}": b for i, b in enumerate(bleu)}
    scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor is not None:
        scores["METEOR"] = meteor.compute_score(gts, res)[0]
    return scores


def test_scores_equal_pycocoevalcap_direct_including_meteor():
    scorer = CaptionScorer(meteor=True)
    got = scorer.score(PREDICTIONS, REFERENCES)
    assert set(got) == set(METRIC_NAMES)
    expected = direct_scores(meteor=scorer.meteor)  # same JVM, scores computed by the test's own calls
    assert got == pytest.approx(expected, rel=1e-9)
    assert 0 < got["BLEU-1"] <= 1 and got["CIDEr"] > 0 and 0 < got["METEOR"] < 1


def test_perfect_predictions_and_skipped_meteor():
    scorer = CaptionScorer(meteor=False)
    perfect = scorer.score({k: v[0] for k, v in REFERENCES.items()}, REFERENCES)
    assert "METEOR" not in perfect
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)


def test_mismatched_ids_and_missing_java(monkeypatch):
    with pytest.raises(ValueError, match="missing"):
        CaptionScorer(meteor=False).score({"v1": "x"}, REFERENCES)
    assert check_java()
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(JavaMissingError, match="Java"):
        CaptionScorer(meteor=False)


@pytest.mark.parametrize("line_break", ["\r", "\x0b", "\x0c", "\u2028"])
def test_a_line_break_inside_a_caption_shifts_no_other_caption(line_break):
    """The PTB tokenizer reads one caption per line and pycocoevalcap pairs lines with ids in order;
    before, a "\r" in v1's prediction gave v2 the end of v1's caption and v3 v2's."""
    scorer = CaptionScorer(meteor=False)
    broken = {**PREDICTIONS, "v1": PREDICTIONS["v1"].replace(" moves", line_break + "moves")}
    assert scorer.score(broken, REFERENCES) == pytest.approx(scorer.score(PREDICTIONS, REFERENCES), rel=1e-12)
    assert scorer.score(PREDICTIONS, {**REFERENCES, "v2": [line_break.join(c.split()) for c in REFERENCES["v2"]]}) \
        == pytest.approx(scorer.score(PREDICTIONS, REFERENCES), rel=1e-12)
