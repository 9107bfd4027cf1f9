"""Judges: score (prompt, response) texts with a reward model or a Python function.

A judge is any callable ``judge(prompts, responses) -> (N,) float32 tensor``. Judges see text, so
the policy and the reward model need not share a tokenizer. Two kinds, chosen by :func:`load_judge`:

* a folder written by ``alignkit rm`` -> :class:`RewardModelJudge`;
* ``package.module:function`` or ``path/to/file.py:function`` -> :class:`FunctionJudge`.

A function judge's function is ``reward(prompt: str, response: str) -> float``, called once per
response; or, when the function has an attribute ``batched = True``,
``reward(prompts: list[str], responses: list[str]) -> list[float]``, called once per batch::

    def reward(prompts, responses):
        return [float(len(r) < 200) for r in responses]
    reward.batched = True

Problems with the spec or with what the function returns are ``InputError`` (exit 2) naming the
spec and the field ``reward_model``; an exception raised inside the function propagates as it is.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..errors import InputError

FIELD = "reward_model"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@runtime_checkable
class Judge(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(N,) float32 scores, higher = better, one per (prompts[i], responses[i])."""
        ...


def _check_pairs(prompts, responses) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


# ----------------------------------------------------------------------------- Python functions

class FunctionJudge:
    """Scores from a Python function named by ``spec`` (see the module docstring)."""

    def __init__(self, spec: str):
        self.spec = str(spec)
        self.fn = _load_function(self.spec)
        self.batched = getattr(self.fn, "batched", False) is True

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        _check_pairs(prompts, responses)
        if self.batched:
            out = self.fn(list(prompts), list(responses))
            got = _as_list(out)
            if got is None or len(got) != len(prompts):
                what = f"{len(got)} scores" if got is not None else f"{out!r} (a {type(out).__name__})"
                raise self._error(f"returned {what} for {len(prompts)} responses; a batched reward function "
                                  "returns a list with one number per response")
        else:
            got = [self.fn(p, r) for p, r in zip(prompts, responses)]
        return torch.tensor([self._number(v, i) for i, v in enumerate(got)], dtype=torch.float32)

    def _number(self, value, index: int) -> float:
        x = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise self._error(f"returned {value!r} (a {type(value).__name__}) for response {index}; "
                              "expected a number")
        if not math.isfinite(float(x)):
            raise self._error(f"returned {value!r} for response {index}; expected a finite number")
        return float(x)

    def _error(self, message: str) -> InputError:
        return InputError(f"reward function {self.spec} {message}", field=FIELD)


def _as_list(value) -> list | None:
    """A batched function's result as a list: lists, tuples, 1-D numpy arrays and tensors; else None."""
    if isinstance(value, (list, tuple)):
        return list(value)
    tolist = getattr(value, "tolist", None)
    out = tolist() if callable(tolist) else None
    return out if isinstance(out, list) else None


def _load_function(spec: str):
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise InputError(f"reward function spec {spec!r} must be 'package.module:function' or "
                         "'path/to/file.py:function' (missing ':function')", file=spec, field=FIELD)
    module = _load_file(where, spec) if _is_file_spec(where) else _import_module(where, spec)
    if not hasattr(module, attr):
        raise InputError(f"{where} has no attribute {attr!r}", file=spec, field=FIELD)
    fn = getattr(module, attr)
    if not callable(fn):
        raise InputError(f"{where}:{attr} is not callable (it is a {type(fn).__name__})", file=spec, field=FIELD)
    return fn


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _load_file(where: str, spec: str):
    path = Path(os.path.expanduser(where))
    if not path.is_file():
        raise InputError(f"reward function file not found: {where}", file=spec, field=FIELD)
    name = f"alignkit_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"cannot import {where} as a Python file", file=spec, field=FIELD)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any failure while importing it is bad input
        sys.modules.pop(name, None)
        raise InputError(f"importing {where} failed: {type(e).__name__}: {e}", file=spec, field=FIELD) from e
    return module


def _import_module(where: str, spec: str):
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name and (where == e.name or where.startswith(e.name + ".")):
            raise InputError(f"reward function module not found: {where}", file=spec, field=FIELD) from e
        raise InputError(f"importing {where} failed: {e}", file=spec, field=FIELD) from e
    except Exception as e:
        raise InputError(f"importing {where} failed: {type(e).__name__}: {e}", file=spec, field=FIELD) from e


# ----------------------------------------------------------------------------- reward models

def _training_data_settings(folder: Path) -> dict:
    """The ``data:`` section of the ``config.yaml`` that ``alignkit rm`` saved in ``folder`` ({} without one)."""
    import yaml

    try:
        data = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


class RewardModelJudge:
    """Scores from a reward model saved by ``alignkit rm``, tokenised exactly as its training data.

    Each text is ``prompt + response + EOS`` through ``alignkit.data.ranking.encode_ranking``: plain
    strings as they are, or with ``chat_template=True`` the prompt as one user turn rendered with the
    tokenizer's chat template (training's ``chat_template_for_plain``); a prompt given as a list of
    messages is a conversation, rendered with the template. ``max_length`` / ``max_prompt_length``
    truncate as in training. ``chat_template`` and ``max_prompt_length`` left as None are read from the
    folder's ``config.yaml`` (the settings ``alignkit rm`` trained with), so a model trained on
    templated prompts is judged on templated prompts. Sequences are scored in batches of ``batch_size`` sorted by length.
    ``tokenizer``: used only for a folder saved without one (the folder's own tokenizer always wins,
    so a policy tokenizer passed along cannot mis-tokenise); a copy, as the judge sets its pad id.
    """

    def __init__(self, path: str, *, batch_size: int = 16, max_length: int | None = None,
                 max_prompt_length: int | None = None, chat_template: bool | None = None, tokenizer=None,
                 device: str | torch.device | None = None, trust_remote_code: bool = False):
        from ..models import load_tokenizer
        from ..reward_model import (
            _is_reward_model_folder,
            load_reward_model,
            set_reward_pad_token,
        )

        if batch_size < 1:
            raise InputError(f"must be at least 1, got {batch_size}", field="batch_size")
        folder = Path(path)
        if not _is_reward_model_folder(folder):
            raise InputError("is not a reward model folder (its config.json names no *ForSequenceClassification "
                             "architecture); train one with `alignkit rm`", file=str(path), field=FIELD)
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):  # the reward model's own tokenizer wins
            self.tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        elif tokenizer is not None:
            self.tokenizer = copy.deepcopy(tokenizer)
        else:
            raise InputError("holds no tokenizer and none was given", file=str(path), field=FIELD)
        self.model = load_reward_model(str(path), trust_remote_code=trust_remote_code).eval()
        if device is not None:
            self.model.to(device)
        self.pad_token_id = set_reward_pad_token(self.model, self.tokenizer)
        trained = _training_data_settings(folder)
        if max_prompt_length is None:
            max_prompt_length = trained.get("max_prompt_length")
        self.batch_size, self.max_length, self.max_prompt_length = batch_size, max_length, max_prompt_length
        self.chat_template = bool(trained.get("chat_template_for_plain", False)) if chat_template is None \
            else chat_template

    def encode(self, prompt, response: str) -> list[int]:
        """Token ids of prompt + response + EOS, as the reward model was trained on them."""
        from ..data.ranking import RankingExample, encode_ranking

        conversational = not isinstance(prompt, str)
        resp = [{"role": "assistant", "content": response}] if conversational else response
        enc = encode_ranking(RankingExample(prompt, [resp], conversational, []), self.tokenizer,
                             max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                             chat_template_for_plain=self.chat_template)
        return enc.prompt_ids + enc.response_ids[0]

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        from ..reward_model import reward_scores

        _check_pairs(prompts, responses)
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        device = next(self.model.parameters()).device
        scores = torch.zeros(len(seqs), dtype=torch.float32)
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            width = max(len(seqs[i]) for i in rows)
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for n, i in enumerate(rows):
                ids[n, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[n, :len(seqs[i])] = 1
            scores[rows] = reward_scores(self.model, ids.to(device), mask.to(device)).float().cpu()
        return scores


# ----------------------------------------------------------------------------- choosing and shaping

def load_judge(spec_or_path: str, tokenizer=None, **kwargs) -> Judge:
    """A folder -> :class:`RewardModelJudge` (``tokenizer`` and ``kwargs`` go to it); anything else
    -> :class:`FunctionJudge` (``tokenizer`` and ``kwargs`` are not used)."""
    if Path(os.path.expanduser(str(spec_or_path))).is_dir():
        return RewardModelJudge(os.path.expanduser(str(spec_or_path)), tokenizer=tokenizer, **kwargs)
    return FunctionJudge(str(spec_or_path))


def eos_penalty(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """``scores + penalty`` for responses that reached the horizon without EOS, (N,) -> (N,).

    A truncated response is unfinished; scoring it as if finished rewards rambling. InstructGPT-style
    RLHF and TRL (``missing_eos_penalty``) give such responses a fixed penalty. Here the penalty is
    ADDED, so it is negative (e.g. -1.0; TRL's ``missing_eos_penalty=1.0`` subtracts); 0 = off.
    """
    if penalty > 0:
        raise InputError(f"must be <= 0 (it is added to the score; e.g. -1.0), got {penalty}", field="eos_penalty")
    missing = ~ended_with_eos.to(device=scores.device, dtype=torch.bool)  # (N,)
    return scores + penalty * missing.to(scores.dtype)
