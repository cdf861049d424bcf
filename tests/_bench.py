"""Import a script of bench/ as a module, for the tests of its smoke mode and baselines."""

import importlib.util
import sys
from pathlib import Path


def load_bench(name: str):
    """bench/<name>.py as a module named `<name>_bench`."""
    path = Path(__file__).parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
