"""Prompts for rollouts (PPO, GRPO, online methods): ``{"prompt": str | [messages]}`` rows.

Any row with a ``prompt`` is accepted, so preference, ranking and SFT files double as prompt sets
(their other fields are ignored). Plain strings are used as they are (or, with
``chat_template_for_plain``, as one user turn rendered with the chat template and its generation
prompt); conversations are rendered with the chat template and the generation prompt. A prompt
longer than ``max_prompt_length`` keeps its END. The judge sees ``text``: the prompt string, or
the content of a conversation's last user turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .preference import _check_prompt, _Ctx, _messages
from .readers import read_records
from .report import DataReport
from .tokenize import _ids, _render


@dataclass
class PromptItem:
    text: str              # what the judge sees
    ids: list[int]         # what the policy is given (rendered, tokenised, truncated from the left)
    truncated: bool = False
    index: int = -1

    # DataReport counts these
    @property
    def prompt_truncated(self) -> bool:
        return self.truncated

    completion_truncated = False


def validate_prompt_row(row, where) -> tuple[str | list, str]:
    """(the prompt as given, the judge's text) or InputError naming file, line and field."""
    ctx = _Ctx(where)
    if not isinstance(row, dict):
        raise ctx.error(f"expected an object, got {type(row).__name__}", "row", "wrong_type")
    value = row.get("prompt")
    if value is None and isinstance(row.get("messages"), list):  # an SFT conversation: its turns up to the last user one
        msgs = _messages(row["messages"], "messages", ctx)
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
        value = msgs[:last_user + 1] if last_user >= 0 else None
    if value is None:
        raise ctx.error("missing (a prompt row needs 'prompt')", "prompt", "missing_field")
    if isinstance(value, str):
        if not value.strip():
            raise ctx.error("is empty", "prompt", "missing_field")
        return value, value
    msgs = _messages(value, "prompt", ctx)
    _check_prompt(msgs, "prompt", ctx)
    return msgs, msgs[-1]["content"]


def encode_prompt(prompt, tokenizer, *, max_prompt_length: int | None, chat_template_for_plain: bool) -> tuple[list[int], bool]:
    if isinstance(prompt, str):
        text = _render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True) \
            if chat_template_for_plain else prompt
    else:
        text = _render(tokenizer, prompt, generation_prompt=True)
    ids = _ids(tokenizer, text)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        return ids[-max_prompt_length:], True
    return ids, False


def load_prompts(sources: list[str] | str, tokenizer, *, max_prompt_length: int | None,
                 chat_template_for_plain: bool = False, skip_invalid: bool = False,
                 split: str = "train") -> tuple[list[PromptItem], DataReport]:
    """Every row validated and tokenised before returning (bad rows: InputError, or skipped and counted)."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise InputError("no data sources given", field="data")
    out: list[PromptItem] = []
    report = DataReport()
    for source in sources:
        for where, row in read_records(source, split=split):
            report.rows += 1
            try:
                if isinstance(row, InputError):
                    raise row
                prompt, text = validate_prompt_row(row, where)
                ids, cut = encode_prompt(prompt, tokenizer, max_prompt_length=max_prompt_length,
                                         chat_template_for_plain=chat_template_for_plain)
                if not ids:
                    raise InputError("renders to no tokens", file=where[0], line=where[1], field="prompt",
                                     kind="missing_field")
            except InputError as err:
                if not skip_invalid or err.kind == "chat_template":
                    raise
                report.add_skipped(err)
                continue
            item = PromptItem(text, ids, cut, len(out))
            out.append(item)
            report.add_kept(item)
    if not out:
        detail = f" ({report.summary()})" if report.rows else " (the data are empty)"
        raise InputError("no prompts" + detail, file=", ".join(map(str, sources)), field="prompt")
    return out, report
