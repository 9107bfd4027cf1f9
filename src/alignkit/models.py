"""Loading, adapting and saving causal LMs.

A model is named by one string: the embedded name (``smollm2-135m-instruct``), a ``.gguf`` file,
a local Hugging Face folder (full model or PEFT adapter) or a hub id (``org/name``). GGUF models are
de-quantised once into a plain HF folder under ``cache_root()/models/<key>/hf``; every later load
reads that folder (~0.3 s instead of ~20 s), and LoRA adapters trained on them point at it.

Saved layout (``save_model``):
  * full model: ``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files;
  * LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` + tokenizer at the top;
  * LoRA with ``merge_lora=True``: the merged full model at the top, the adapter in ``adapter/``.
    The adapter cannot share the top folder with ``config.json``: transformers would load the merged
    weights and then apply the adapter a second time.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import embedded
from .errors import InputError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files a save may leave behind from an earlier save of another kind; removed so a folder never
# mixes an old full model with a new adapter (transformers would stack them).
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "adapter_config.json", "adapter_model.safetensors", "adapter")


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["embedded", "gguf", "folder", "hub"]
    path: str  # folder holding the gguf file / the model folder / the hub id
    gguf_file: str | None = None


def resolve_model_source(name_or_path: str) -> ModelSource:
    """Decide what a model string names, failing early (InputError, field 'model') on typos."""
    name = str(name_or_path)
    if name == embedded.EMBEDDED_NAME:
        path = embedded.gguf_path()
        return ModelSource("embedded", str(path.parent), path.name)
    path = Path(os.path.expanduser(name))
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"no such GGUF file: {name}", file=name, field="model")
        path = path.resolve()
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise InputError(f"folder {name} holds neither config.json nor adapter_config.json",
                             file=name, field="model")
        return ModelSource("folder", str(path.resolve()))
    if not path.exists() and _HUB_ID.match(name) and not name.startswith("."):
        return ModelSource("hub", name)
    raise InputError(f"no such model folder or file: {name}", file=name, field="model")


def _cache_key(src: ModelSource) -> str:
    if src.kind == "embedded":
        return embedded.EMBEDDED_NAME
    file = Path(src.path) / src.gguf_file
    st = file.stat()
    digest = hashlib.sha256(f"{file}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"gguf-{digest[:16]}"


def cached_model_dir(name_or_path: str) -> Path:
    """Where the de-quantised copy of an embedded/GGUF model lives (existing or not)."""
    src = resolve_model_source(name_or_path)
    if src.kind not in ("embedded", "gguf"):
        raise ValueError(f"{name_or_path} is not a GGUF model")
    return (embedded.cache_root() / "models" / _cache_key(src) / "hf").resolve()


def _with_pad_token(tok):
    """Batching needs a pad token; many causal LMs ship none, so pad with EOS. Padded positions are
    always masked out of attention and loss, so reusing EOS changes no result."""
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """The tokenizer for a model string, with ``pad_token`` set (EOS if the model has none)."""
    from transformers import AutoTokenizer

    src = resolve_model_source(name_or_path)
    if src.kind == "embedded":
        return _with_pad_token(embedded.load_embedded_tokenizer())
    try:
        if src.kind == "gguf":
            cached = cached_model_dir(name_or_path)
            if (cached / "tokenizer_config.json").is_file():
                return _with_pad_token(AutoTokenizer.from_pretrained(cached))
            return _with_pad_token(AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file))
        folder = Path(src.path)
        if src.kind == "folder" and not (folder / "tokenizer_config.json").is_file() \
                and (folder / "adapter_config.json").is_file():
            return load_tokenizer(_adapter_base(folder), trust_remote_code=trust_remote_code)
        return _with_pad_token(AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load a tokenizer from {name_or_path}: {e}", file=name_or_path,
                         field="model") from e


@dataclass(frozen=True)
class TokenizerFiles:
    """A tokenizer reduced to the files ``save_pretrained`` writes, held as bytes, plus its pad id.

    An offline trainer (SFT, DPO, reward model) needs its tokenizer only to encode the data before
    training and to write the tokenizer files next to each saved model. Holding the live object
    through training costs ~40 MB on a 49k vocabulary (the Rust vocabulary, merges and regex
    tables; a few MB of files), which on a small model is a tenth of the run's peak memory.
    ``save_pretrained`` writes exactly the files the tokenizer itself would have written."""

    files: tuple[tuple[str, bytes], ...]
    pad_token_id: int | None

    @classmethod
    def of(cls, tokenizer) -> TokenizerFiles:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="alignkit-tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            files = tuple((str(p.relative_to(tmp)), p.read_bytes())
                          for p in sorted(Path(tmp).rglob("*")) if p.is_file())
        return cls(files, tokenizer.pad_token_id)

    def save_pretrained(self, folder) -> None:
        for name, data in self.files:
            path = Path(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def load_causal_lm(name_or_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load any model string as a plain (unquantised, unmerged-adapter-free) ``PreTrainedModel``."""
    return _load(name_or_path, dtype, trust_remote_code, depth=0)


def _load(name_or_path, dtype, trust_remote_code, depth):
    from transformers import AutoModelForCausalLM

    if depth > 4:
        raise InputError(f"adapter base chain too deep at {name_or_path}", file=str(name_or_path), field="model")
    src = resolve_model_source(name_or_path)
    if src.kind in ("embedded", "gguf"):
        path = _ensure_dequantised(name_or_path, src)
    elif src.kind == "folder" and not (Path(src.path) / "config.json").is_file():
        return _load_adapter_folder(Path(src.path), dtype, trust_remote_code, depth)
    else:
        path = src.path
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load a causal LM from {name_or_path}: {e}", file=str(name_or_path),
                         field="model") from e
    return model


def _adapter_base(folder: Path) -> str:
    try:
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"unreadable adapter_config.json: {e}", file=str(folder), field="model") from e
    if not base:
        raise InputError("adapter_config.json names no base_model_name_or_path", file=str(folder), field="model")
    return base


def _load_adapter_folder(folder: Path, dtype, trust_remote_code, depth):
    """A PEFT adapter folder: load its base (recursively), apply the adapter, merge, so callers
    always get one plain model whatever they pointed at."""
    from peft import PeftModel

    base = _load(_adapter_base(folder), dtype, trust_remote_code, depth + 1)
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"cannot load the adapter in {folder}: {e}", file=str(folder), field="model") from e
    return model.merge_and_unload()


def _ensure_dequantised(name_or_path: str, src: ModelSource) -> Path:
    """De-quantise a GGUF once into a plain HF folder. Written to a temp folder then renamed, so a
    concurrent process sees either nothing or the whole folder; the loser of a race drops its copy."""
    from transformers import AutoModelForCausalLM

    final = cached_model_dir(name_or_path)
    if (final / "config.json").is_file():
        return final
    log.info("de-quantising %s once into %s", name_or_path, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-hf-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
        plain_state_model(model).save_pretrained(tmp)
        tok = embedded.load_embedded_tokenizer() if src.kind == "embedded" else \
            load_tokenizer(str(Path(src.path) / src.gguf_file))
        tok.save_pretrained(tmp)
    except (OSError, ValueError, KeyError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"cannot read GGUF model {name_or_path}: {e}", file=str(name_or_path), field="model") from e
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def plain_state_model(model):
    """A GGUF-loaded model carries ``quantization_config`` and transformers refuses to save it,
    though its weights are already plain tensors. Rebuild a fresh model from a clean config copy
    and load the weights; any other model is returned unchanged."""
    from transformers import AutoModelForCausalLM

    if getattr(model.config, "quantization_config", None) is None:
        return model
    cfg = copy.deepcopy(model.config)
    del cfg.quantization_config
    dtype = next(model.parameters()).dtype
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    fresh.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.train(model.training)


def _is_peft(model) -> bool:
    # a PeftModel exists only once peft is imported; a full fine-tuning run never imports it (~10 MB)
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def window_cuts(model, length: int) -> bool:
    """Does the model's sliding attention window (Mistral's; Qwen's configs set it only with
    ``use_sliding_window``) drop keys from sequences of ``length`` tokens? Where it does, only
    transformers' own masks apply it: callers that build their own masks must not take over."""
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return window is not None and length > window


def _check_finite(model) -> None:
    """Refuse to save NaN or Inf. A NaN or an infinity in a tensor makes its sum NaN or infinite,
    so a finite sum clears the tensor without a tensor-sized temporary (``isfinite`` would allocate
    a mask as large as the tied embedding table, at the end of training when memory is highest).
    A non-finite sum (which overflow of finite values can also give) is checked element by element
    in blocks of 2^20 values."""
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or torch.isfinite(t.sum()):
            continue
        if not all(torch.isfinite(block).all() for block in t.reshape(-1).split(1 << 20)):
            raise RuntimeError(f"refusing to save: tensor {name} holds NaN or Inf")


def _loadable_base(name: str | None) -> str | None:
    """Adapter configs must name a base others can load: the de-quantised cache for GGUF bases,
    an absolute path for local folders, the id itself for hub models."""
    if not name:
        return name
    try:
        src = resolve_model_source(name)
    except InputError:
        return name
    if src.kind in ("embedded", "gguf"):
        return str(cached_model_dir(name))
    return src.path


def save_model(model, tokenizer, output_dir, *, merge_lora: bool = False, consume: bool = False) -> None:
    """Write a model (see module docstring for the layout) atomically: everything is written into
    ``output_dir/.tmp-model-<pid>`` first and moved into place file by file only once complete.

    ``consume``: the caller is done with ``model`` (a run's final save), so a LoRA merge happens in
    place, after the adapter is written, instead of on a deep copy: no second copy of the base
    weights at the end of the run (+534 MB on the embedded model, the peak of a LoRA ``--merge`` run).
    The files are the same; ``model`` is left merged and unwrapped."""
    _check_finite(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if _is_peft(model):
            _write_adapter(model, tmp / "adapter" if merge_lora else tmp)
            if merge_lora:
                plain_state_model((model if consume else copy.deepcopy(model)).merge_and_unload()).save_pretrained(tmp)
        else:
            plain_state_model(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in _MODEL_FILES:  # drop leftovers of a different earlier save
            if (out / name).exists() and not (tmp / name).exists():
                _remove(out / name)
        for entry in tmp.iterdir():
            if entry.is_dir() and (out / entry.name).exists():
                _remove(out / entry.name)
            os.replace(entry, out / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_adapter(model, folder: Path) -> None:
    cfg = model.peft_config[model.active_adapter]
    original = cfg.base_model_name_or_path
    cfg.base_model_name_or_path = _loadable_base(original)
    try:
        model.save_pretrained(str(folder))
    finally:
        cfg.base_model_name_or_path = original


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def add_lora(model, *, r: int, alpha: int | None = None, dropout: float = 0.0, target_modules="all-linear"):
    """Wrap a model with LoRA adapters; only adapter weights train. ``lm_head`` is always excluded:
    adapting the output projection costs vocab-sized matrices and destabilises the policy."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                     target_modules=target_modules, exclude_modules=["lm_head"], task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def reference_context(model):
    """With LoRA the reference model is the policy with adapters switched off: the same weights,
    no second copy in memory. Other models need no context (their reference is a frozen copy)."""
    return model.disable_adapter() if _is_peft(model) else contextlib.nullcontext()


def frozen_copy(model):
    """The default reference for full fine-tuning: an independent, gradient-free copy in eval mode."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def store_frozen_linears_in(model, dtype: torch.dtype) -> int:
    """Store the weights of frozen linear layers (a LoRA run's base projections) in ``dtype``.

    Under bf16 autocast every matmul casts its fp32 weight to bf16 on each call; for frozen
    weights that cast is pure overhead (about a fifth of a LoRA step on the embedded model) and
    the stored copy is bit-identical to what autocast would make. The LM head (often tied to the
    embeddings) and the norms stay fp32 so the residual stream keeps its precision. peft's
    up-cast of adapter inputs to the fp32 adapter weights is switched off as well (autocast
    casts them straight back). Trainable weights stay fp32. Returns the number of layers converted.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):  # peft would cast bf16 inputs up to the fp32 adapter
            module.cast_input_dtype_enabled = False  # weights, and autocast back down again
    converted = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head and not module.weight.requires_grad \
                and module.weight.dtype != dtype:
            module.to(dtype)
            converted += 1
    return converted
