"""The export stage: the merged model (run_dir/merged/) in a format other runtimes load.

One dispatch on ``export.format``; each format is its own module, imported with its library only
when chosen. Today: ``gguf`` (llama.cpp and the tools built on it), written by ``gguf.py``.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from qlorax.errors import QloraxError
from qlorax.schema import RunSpec

# format -> (module, library it imports, how to install that library)
FORMATS: dict[str, tuple[str, str, str]] = {
    "gguf": ("qlorax.engine.export.gguf", "gguf", "pip install 'qlorax[gguf]'"),
}


def missing_library(fmt: str) -> str | None:
    """Why ``fmt`` cannot be written here (its library is absent, and how to install it), or None."""
    _, library, install = FORMATS[fmt]
    if importlib.util.find_spec(library) is not None:
        return None
    return f"export.format={fmt} needs the '{library}' package, which is not installed: {install}"


def check_exportable(spec: RunSpec, model_dir: str) -> None:
    """Refuse, before anything is trained, a model the chosen format cannot map (reads its config and tokenizer files)."""
    module = importlib.import_module(FORMATS[spec.export.format][0])
    module.check_model(model_dir)


def export(spec: RunSpec) -> dict[str, Any]:
    """Write the run's merged model in ``export.format``; returns what was written."""
    problem = missing_library(spec.export.format)
    if problem:
        raise QloraxError(problem)
    module = importlib.import_module(FORMATS[spec.export.format][0])
    return module.export(spec)
