"""Caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

Captions are PTB-tokenised (Stanford tokenizer jar, lower-cased, punctuation removed) and scored
by pycocoevalcap's own scorers, so numbers match the COCO caption evaluation used by the field.
Both the tokenizer and METEOR run Java: `check_java()` says what is missing before any work
starts. METEOR keeps one JVM per `CaptionScorer` (about 8 s to start), so reuse the scorer
across evaluations. Scores are pycocoevalcap's fractions (papers print them x100).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from functools import cached_property
from pathlib import Path

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class JavaMissingError(RuntimeError):
    """Java is needed by the PTB tokenizer and METEOR and is not usable."""


def check_java() -> str:
    """Return `java -version`'s first line, or raise JavaMissingError saying what is missing."""
    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(
            "caption metrics need Java (the PTB tokenizer and METEOR of pycocoevalcap run as jars), "
            "but `java` is not on PATH; install a Java runtime 8 or newer (e.g. `apt-get install "
            "default-jre-headless`)"
        )
    result = subprocess.run([java, "-version"], capture_output=True, text=True)
    if result.returncode != 0:
        raise JavaMissingError(f"`{java} -version` failed: {result.stderr.strip()}")
    import pycocoevalcap.meteor
    import pycocoevalcap.tokenizer

    for package, jar in ((pycocoevalcap.tokenizer, "stanford-corenlp-3.4.1.jar"), (pycocoevalcap.meteor, "meteor-1.5.jar")):
        path = Path(package.__path__[0]) / jar
        if not path.exists():
            raise JavaMissingError(f"pycocoevalcap is missing {path}; reinstall pycocoevalcap")
    return (result.stderr or result.stdout).splitlines()[0]


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """PTB-tokenise {id: [caption, ...]} with pycocoevalcap's tokenizer, each caption's whitespace
    runs made single spaces first: the tokenizer reads one caption per line and pairs lines with ids
    in order, and pycocoevalcap replaces only "\\n", so a "\\r", "\\x0b", "\\x0c" or "\\u2028" in a
    caption (CLIP's vocabulary can generate the first three) gave every later id the next caption."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    lines = {key: [{"caption": " ".join(caption.split())} for caption in values] for key, values in captions.items()}
    return PTBTokenizer().tokenize(lines)


class CaptionScorer:
    """Scores predicted captions against references; `meteor=False` skips the METEOR JVM."""

    def __init__(self, meteor: bool = True):
        self.java_version = check_java()
        self.use_meteor = meteor

    @cached_property
    def meteor(self):
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()

    def score(self, predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
        """Corpus scores of {id: caption} against {id: [reference, ...]} (same ids)."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if set(predictions) != set(references):
            missing = sorted(set(references) - set(predictions))[:5]
            extra = sorted(set(predictions) - set(references))[:5]
            raise ValueError(f"predictions and references differ: missing {missing}, unknown {extra}")
        empty = [key for key, values in references.items() if not values]
        if empty:
            raise ValueError(f"videos without reference captions: {empty[:5]}")
        keys = sorted(references)
        gts = ptb_tokenize({k: references[k] for k in keys})
        res = ptb_tokenize({k: [predictions[k]] for k in keys})
        with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap's BLEU prints its n-gram counts
            bleu, _ = Bleu(4).compute_score(gts, res)
        scores = {f"BLEU-{n + 1}": float(value) for n, value in enumerate(bleu)}
        if self.use_meteor:
            scores["METEOR"] = float(self.meteor.compute_score(gts, res)[0])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        return scores
