"""Import the repository's stand-alone scripts (benchmarks/, docs/), which are not in any
package, by path, so that their tests can call them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[3]


def load_script(relpath: str, name: str) -> ModuleType:
    """The module at ROOT/relpath, registered as `name` before it runs (dataclasses look their
    module up by name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
