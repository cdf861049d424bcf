"""Argument types for numeric command-line options: a value out of range is an argparse error that
names the option and the value (`argument --fps: must be > 0, got 0`) before any work starts."""

from __future__ import annotations

import argparse
import math


def _ranged(convert, name: str, accepts, condition: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {condition}, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _ranged(int, "an integer", lambda value: value > 0, "> 0")
non_negative_int = _ranged(int, "an integer", lambda value: value >= 0, ">= 0")
positive_float = _ranged(float, "a number", lambda value: math.isfinite(value) and value > 0, "> 0 and finite")
non_negative_float = _ranged(float, "a number", lambda value: math.isfinite(value) and value >= 0, ">= 0 and finite")
fraction = _ranged(float, "a number", lambda value: 0 <= value <= 1, "between 0 and 1")
crf = _ranged(int, "an integer", lambda value: 0 <= value <= 51, "between 0 and 51 (libx264's range)")
