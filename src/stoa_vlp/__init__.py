"""STOA-VLP: video-language pre-training with spatial-temporal modelling of objects and actions."""

__version__ = "0.1.0"
