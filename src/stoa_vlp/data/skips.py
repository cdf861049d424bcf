"""Bad-sample accounting for training data.

In evaluation every problem is an error naming the file. In training a sample whose video is missing
or unreadable, whose caption is empty or unreadable, or whose detections were made on its frames turned
sideways, raises `BadSample` (its reason one of
SKIP_REASONS) and is skipped (another sample is drawn), logged and counted in a `SkipCounter` shared
with the DataLoader workers; training stops with `TooManyBadSamples` once the skipped share exceeds
data.max_bad_samples, or once MAX_BAD_IN_A_ROW samples drawn in a row could not be read
(`too_many_in_a_row`). `skip_summary` words the counts.
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from stoa_vlp.data.dataset import Sample

log = logging.getLogger(__name__)

SKIP_REASONS = ("missing_file", "bad_video", "empty_caption", "bad_caption", "bad_detections")
WARNINGS_PER_REASON = 10  # skips logged one by one per process; later ones only counted


class TooManyBadSamples(RuntimeError):
    """The share of skipped training samples went over data.max_bad_samples, or MAX_BAD_IN_A_ROW samples
    drawn in a row could not be read."""


class BadSample(ValueError):
    """A sample that cannot be built; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipCounter:
    """Counts drawn and skipped samples per reason, in shared memory visible to all workers.

    Create it in the main process before the DataLoader starts its workers. Its lock is made for
    spawned processes, which forked ones can use too (one made for forking cannot be passed to a
    spawned worker: a DataLoader given multiprocessing_context="spawn" failed to start). It is a named
    semaphore: after an exit that skips finalisers (SIGKILL, os._exit) multiprocessing's resource
    tracker removes it, with a warning about leaked semaphores.
    """

    def __init__(self, max_share: float, min_seen: int = 100):
        self.max_share = max_share
        self.min_seen = min_seen  # the share is not judged before this many samples were drawn
        self._counts = multiprocessing.get_context("spawn").Array("q", 1 + len(SKIP_REASONS))  # seen, skips...
        self._logged = dict.fromkeys(SKIP_REASONS, 0)

    def seen(self) -> None:
        with self._counts.get_lock():
            self._counts[0] += 1

    def skip(self, reason: str, message: str) -> None:
        """Count and log a skip; raise TooManyBadSamples when the share goes over max_share."""
        with self._counts.get_lock():
            self._counts[1 + SKIP_REASONS.index(reason)] += 1
        if self._logged[reason] < WARNINGS_PER_REASON:
            self._logged[reason] += 1
            log.warning("skipped sample (%s): %s", reason, message)
        self.check()

    def attempt(self, load: Callable[[], Sample]) -> Sample | None:
        """`load()`, counted as a sample drawn; None, counted and logged as a skip, when it raises
        BadSample."""
        self.seen()
        try:
            return load()
        except BadSample as error:
            self.skip(error.reason, str(error))
            return None

    def add(self, total: int, skipped: dict[str, int]) -> None:
        """Add counts carried over from earlier (a resumed run's checkpoint)."""
        with self._counts.get_lock():
            self._counts[0] += total
            for reason, count in skipped.items():
                self._counts[1 + SKIP_REASONS.index(reason)] += count

    @property
    def total(self) -> int:
        return int(self._counts[0])

    @property
    def skipped(self) -> dict[str, int]:
        return {reason: int(self._counts[1 + i]) for i, reason in enumerate(SKIP_REASONS)}

    def share(self) -> float:
        return sum(self.skipped.values()) / max(1, self.total)

    def check(self) -> None:
        if self.total >= self.min_seen and self.share() > self.max_share:
            raise TooManyBadSamples(f"{self.summary()}: more than data.max_bad_samples={self.max_share:.2%}")

    def summary(self) -> str:
        return skip_summary(self.total, self.skipped)


# samples drawn in a row that could not be read before training stops whatever data.max_bad_samples
# allows: at 1 (tolerate any share), a split of only bad samples was drawn from forever
MAX_BAD_IN_A_ROW = 100


def too_many_in_a_row(skips: SkipCounter) -> TooManyBadSamples:
    return TooManyBadSamples(f"{MAX_BAD_IN_A_ROW} samples drawn in a row could not be read ({skips.summary()}): "
                             "is the data where the config says (data.train, data.video_root)?")


def skip_summary(total: int, skipped: dict[str, int]) -> str:
    """"skipped K of N samples loaded (P%): reason count, ..." for `total` samples drawn and skips per
    reason. Loaded, not trained on: data-loading workers read ahead of the steps."""
    detail = ", ".join(f"{reason} {count}" for reason, count in skipped.items() if count)
    share = sum(skipped.values()) / max(1, total)
    return f"skipped {sum(skipped.values())} of {total} samples loaded ({share:.2%})" + (f": {detail}" if detail else "")
