"""Normalise one raw row into a :class:`PreferenceExample`, accepting TRL's preference formats.

* standard: ``{"prompt": str, "chosen": str, "rejected": str}``
* conversational: ``{"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}`` with
  ``msgs = {"role": "system"|"user"|"assistant", "content": str}``
* implicit prompt: ``{"chosen": [msgs], "rejected": [msgs]}``; the longest common prefix of
  the two conversations is the prompt, the rest are the completions.

A string row must have a prompt (the rare implicit string form is refused). An optional
numeric ``"margin"`` is passed through. Every problem raises :class:`InputError` naming the
file, line and field, with a ``kind`` used to count skipped rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from ..errors import InputError

Messages = list[dict]
Text = Union[str, Messages]
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PreferenceExample:
    """One validated pair. Conversational examples hold message lists (``{"role", "content"}``
    only); the completions are the assistant turn(s) after the prompt."""

    prompt: Text
    chosen: Text
    rejected: Text
    conversational: bool
    margin: float | None = None


class _Ctx:
    """Builds InputErrors that name the row's place."""

    def __init__(self, where: tuple[str, int]):
        self.file, self.line = where

    def error(self, message: str, field: str, kind: str) -> InputError:
        return InputError(message, file=self.file, line=self.line, field=field, kind=kind)


def validate_preference_row(row: Any, where: tuple[str, int]) -> PreferenceExample:
    """Validate ``row`` (from ``read_records``) and return its normalised example."""
    ctx = _Ctx(where)
    if not isinstance(row, dict):
        raise ctx.error(f"expected an object, got {type(row).__name__}", "row", "wrong_type")
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise ctx.error("missing (a preference row needs 'chosen' and 'rejected')",
                            name, "missing_field")
    margin = _margin(row.get("margin"), ctx)
    if isinstance(row["chosen"], str):
        return _standard(row, ctx, margin)
    if isinstance(row["chosen"], list):
        return _conversational(row, ctx, margin)
    raise ctx.error(f"must be a string or a list of messages, got {type(row['chosen']).__name__}",
                    "chosen", "wrong_type")


def _margin(value: Any, ctx: _Ctx) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):  # CSV cells are strings
        try:
            value = float(value) if value.strip() else None
        except ValueError:
            raise ctx.error(f"must be a number, got '{value}'", "margin", "wrong_type") from None
        if value is None:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ctx.error(f"must be a finite number, got {value!r}", "margin", "wrong_type")
    return float(value)


def _standard(row: dict, ctx: _Ctx, margin: float | None) -> PreferenceExample:
    if row.get("prompt") is None:
        raise ctx.error("missing (string rows need a 'prompt'; only conversational rows may "
                        "leave it implicit)", "prompt", "missing_field")
    for name in ("prompt", "rejected"):
        if not isinstance(row[name], str):
            raise ctx.error(f"must be a string like 'chosen', got {type(row[name]).__name__}",
                            name, "wrong_type")
    if not row["prompt"].strip():
        raise ctx.error("is empty", "prompt", "missing_field")
    for name in ("chosen", "rejected"):
        if not row[name].strip():
            raise ctx.error("is empty", name, "empty_completion")
    if row["chosen"] == row["rejected"]:
        raise ctx.error("is identical to 'rejected'", "chosen", "identical_pair")
    return PreferenceExample(row["prompt"], row["chosen"], row["rejected"], False, margin)


def _messages(value: Any, name: str, ctx: _Ctx) -> Messages:
    """Check a message list's shape (not its role order); keep only role and content."""
    if not isinstance(value, list):
        raise ctx.error(f"must be a list of messages, got {type(value).__name__}", name,
                        "wrong_type")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise ctx.error(f"must be an object with 'role' and 'content', got "
                            f"{type(msg).__name__}", f"{name}[{i}]", "wrong_type")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                got = "missing" if msg.get(key) is None else f"a {type(msg[key]).__name__}"
                raise ctx.error(f"must be a string, got {got}", f"{name}[{i}].{key}", "wrong_type")
        if msg["role"] not in _ROLES:
            raise ctx.error(f"unknown role '{msg['role']}' (use system, user or assistant)",
                            f"{name}[{i}].role", "role_order")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _split_implicit(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Longest common prefix of messages → (prompt, chosen completion, rejected completion)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _check_prompt(prompt: Messages, name: str, ctx: _Ctx) -> None:
    if not prompt:
        raise ctx.error("the prompt is empty; it must end with a user turn", name, "role_order")
    previous = None
    for i, msg in enumerate(prompt):
        role = msg["role"]
        if role == "system" and i != 0:
            raise ctx.error("a system message may only come first", f"{name}[{i}].role",
                            "role_order")
        if role != "system" and role == previous:
            raise ctx.error(f"two '{role}' turns in a row; user and assistant must alternate",
                            f"{name}[{i}].role", "role_order")
        previous = role
    if prompt[-1]["role"] != "user":
        raise ctx.error(f"the prompt must end with a user turn, not '{prompt[-1]['role']}'",
                        f"{name}[{len(prompt) - 1}].role", "role_order")


def _check_completion(completion: Messages, name: str, offset: int, ctx: _Ctx) -> None:
    """A completion is one non-empty assistant turn (alternation forbids a second one)."""
    if not completion or not any(m["content"].strip() for m in completion):
        raise ctx.error("the completion is empty", name, "empty_completion")
    for i, msg in enumerate(completion):
        if msg["role"] != "assistant":
            raise ctx.error(f"completions must be assistant turns, got '{msg['role']}'",
                            f"{name}[{offset + i}].role", "role_order")
        if i > 0:
            raise ctx.error("two 'assistant' turns in a row; user and assistant must alternate",
                            f"{name}[{offset + i}].role", "role_order")


def _conversational(row: dict, ctx: _Ctx, margin: float | None) -> PreferenceExample:
    chosen = _messages(row["chosen"], "chosen", ctx)
    rejected = _messages(row["rejected"], "rejected", ctx)
    if row.get("prompt") is None:  # implicit prompt
        if chosen == rejected:
            raise ctx.error("is identical to 'rejected'", "chosen", "identical_pair")
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
        offset, prompt_name = len(prompt), "chosen"
    else:
        prompt = _messages(row["prompt"], "prompt", ctx)
        offset, prompt_name = 0, "prompt"
    _check_prompt(prompt, prompt_name, ctx)
    _check_completion(chosen, "chosen", offset, ctx)
    _check_completion(rejected, "rejected", offset, ctx)
    if chosen == rejected:
        raise ctx.error("is identical to 'rejected'", "chosen", "identical_pair")
    return PreferenceExample(prompt, chosen, rejected, True, margin)
