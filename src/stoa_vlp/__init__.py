"""STOA-VLP: video-language pre-training with spatial-temporal modelling of objects and actions."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`stoa_vlp.load_run` (stoa_vlp.tasks.runs), imported on first use: `import stoa_vlp` stays light."""
    if name == "load_run":
        from stoa_vlp.tasks.runs import load_run

        return load_run
    raise AttributeError(f"module 'stoa_vlp' has no attribute {name!r}")
