"""Demonstrations for supervised fine-tuning: validate TRL's SFT formats, tokenize, mask the loss.

Accepted rows (every problem raises :class:`InputError` naming file, line and field):

* prompt-completion: ``{"prompt": str, "completion": str}`` — loss on the completion;
* conversational prompt-completion: ``{"prompt": [msgs], "completion": [msgs]}`` — loss on the
  completion's one assistant turn (assistant turns inside the prompt are context only);
* conversation: ``{"messages": [msgs]}`` — loss on every assistant turn, nothing else;
* language modelling: ``{"text": str}`` — loss on every token.

Tokenization follows ``data/tokenize.py`` (TRL's convention): plain strings as they are (the
prompt rendered as a user turn with ``chat_template_for_plain``), each piece tokenized separately
with ``add_special_tokens=False``, the final completion ending with one EOS. Conversations are
rendered incrementally: for each loss turn i the render of ``msgs[:i]`` with the generation
prompt must be a prefix of the render of ``msgs[:i+1]``; the difference, cut right after a
final EOS (ChatML's ``"<|im_end|>\\n"``), is the turn's loss text, and the whitespace cut
belongs to the next (masked) segment.

Truncation, as for preference pairs: ``max_prompt_length`` keeps the END of the prompt (the
tokens before the first loss token); ``max_length`` cuts the end of the sequence, cutting the
prompt further (keeping its end) when it would leave no loss token. The first token of a
sequence never carries loss (nothing predicts it), which also keeps packed rows clean: no
example's token is ever scored from the previous example's last state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .preference import _check_completion, _check_prompt, _Ctx, _messages
from .readers import read_records
from .report import DataReport
from .tokenize import _ids, _render, _strip_after_eos, _with_eos, check_lengths

Messages = list[dict]


@dataclass
class SFTExample:
    """One tokenized demonstration (plain lists; lengths vary)."""

    ids: list[int]
    loss_mask: list[bool]             # True where the token carries loss (never at position 0)
    prompt_truncated: bool = False
    completion_truncated: bool = False
    index: int = -1                   # position in the loaded dataset


# ------------------------------------------------------------------------------- validation

@dataclass(frozen=True)
class _Row:
    """A validated row: plain prompt and completion, plain text, or a conversation whose
    ``loss_turns`` (message indices) carry the loss."""

    kind: str                         # "prompt_completion" | "conversation" | "text"
    prompt: str | None = None
    completion: str | None = None
    messages: tuple = ()
    loss_turns: frozenset = frozenset()


def validate_sft_row(row: Any, where: tuple[str, int]) -> _Row:
    """Check one raw row (from ``read_records``) against the accepted formats."""
    ctx = _Ctx(where)
    if not isinstance(row, dict):
        raise ctx.error(f"expected an object, got {type(row).__name__}", "row", "wrong_type")
    if row.get("messages") is not None:
        return _conversation(_messages(row["messages"], "messages", ctx), ctx)
    if row.get("prompt") is None and row.get("completion") is None and row.get("text") is not None:
        return _text(row["text"], ctx)
    for name in ("prompt", "completion"):
        if row.get(name) is None:
            raise ctx.error("missing (an SFT row needs 'prompt' and 'completion', 'messages', or 'text')",
                            name, "missing_field")
    if isinstance(row["completion"], list) or isinstance(row["prompt"], list):
        return _conversational_pair(row, ctx)
    for name in ("prompt", "completion"):
        if not isinstance(row[name], str):
            raise ctx.error(f"must be a string or a list of messages, got {type(row[name]).__name__}",
                            name, "wrong_type")
    if not row["prompt"].strip():
        raise ctx.error("is empty", "prompt", "missing_field")
    if not row["completion"].strip():
        raise ctx.error("is empty", "completion", "empty_completion")
    return _Row("prompt_completion", prompt=row["prompt"], completion=row["completion"])


def _text(value: Any, ctx: _Ctx) -> _Row:
    if not isinstance(value, str):
        raise ctx.error(f"must be a string, got {type(value).__name__}", "text", "wrong_type")
    if not value.strip():
        raise ctx.error("is empty", "text", "empty_completion")
    return _Row("text", completion=value)


def _conversational_pair(row: dict, ctx: _Ctx) -> _Row:
    prompt = _messages(row["prompt"], "prompt", ctx)
    completion = _messages(row["completion"], "completion", ctx)
    _check_prompt(prompt, "prompt", ctx)
    _check_completion(completion, "completion", 0, ctx)
    return _Row("conversation", messages=tuple(prompt + completion), loss_turns=frozenset([len(prompt)]))


def _conversation(messages: Messages, ctx: _Ctx) -> _Row:
    """system? then user/assistant alternating from a user turn, ending with an assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        last = f"messages[{len(messages) - 1}].role" if messages else "messages"
        raise ctx.error("the conversation must end with an assistant turn (the demonstration)", last,
                        "role_order")
    first = 1 if messages[0]["role"] == "system" else 0
    if first < len(messages) and messages[first]["role"] != "user":
        raise ctx.error("the first turn after the system message must be a user turn",
                        f"messages[{first}].role", "role_order")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    _check_prompt(messages[:last_user + 1], "messages", ctx)  # system first, strict alternation
    _check_completion(messages[last_user + 1:], "messages", last_user + 1, ctx)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns:
        if not messages[i]["content"].strip():
            raise ctx.error("an assistant turn is empty", f"messages[{i}].content", "empty_completion")
    return _Row("conversation", messages=tuple(messages), loss_turns=frozenset(turns))


# ------------------------------------------------------------------------------- tokenization

def _segments(row: _Row, tokenizer, chat_template_for_plain: bool) -> list[tuple[str, bool]]:
    """(text, carries loss) pieces whose concatenation is the rendered example."""
    if row.kind == "text":
        return [(row.completion, True)]
    if row.kind == "prompt_completion":
        prompt = row.prompt
        if chat_template_for_plain:
            prompt = _render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
        return [(prompt, False), (row.completion, True)]
    msgs, pieces, done = list(row.messages), [], ""
    for i in sorted(row.loss_turns):
        before = _render(tokenizer, msgs[:i], generation_prompt=True)
        full = _render(tokenizer, msgs[:i + 1], generation_prompt=False)
        if not (before.startswith(done) and full.startswith(before)):
            raise InputError(
                "the tokenizer's chat template does not render a conversation incrementally (the "
                "render up to an assistant turn, with the generation prompt, is not a prefix of the "
                "render with that turn), so assistant tokens cannot be located; use a template that "
                "renders turns incrementally", field="chat_template", kind="chat_template")
        turn = _strip_after_eos(full[len(before):], tokenizer.eos_token)
        pieces += [(before[len(done):], False), (turn, True)]
        done = before + turn
    return pieces


def _tokenize(pieces: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[bool]]:
    """Each piece tokenized on its own; the last (a loss piece) ends with EOS."""
    ids: list[int] = []
    mask: list[bool] = []
    for k, (text, loss) in enumerate(pieces):
        piece = _ids(tokenizer, text) if text else []
        if k == len(pieces) - 1:
            piece = _with_eos(piece, tokenizer.eos_token_id)
        ids += piece
        mask += [loss] * len(piece)
    if mask:
        mask[0] = False  # nothing predicts the first token
    return ids, mask


def truncate_sft(ids: list[int], mask: list[bool], *, max_length: int | None,
                 max_prompt_length: int | None) -> SFTExample:
    """Apply the module's truncation rules; the prompt is everything before the first loss token."""
    p_cut = c_cut = False
    first = mask.index(True) if True in mask else len(mask)
    if max_prompt_length is not None and first > max_prompt_length:
        drop = first - max_prompt_length
        ids, mask, first, p_cut = ids[drop:], mask[drop:], max_prompt_length, True
    if max_length is not None and len(ids) > max_length:
        if first > max_length - 1:  # keep at least one loss token
            drop = first - (max_length - 1)
            ids, mask, p_cut = ids[drop:], mask[drop:], True
        ids, mask, c_cut = ids[:max_length], mask[:max_length], True
    mask = [False] + mask[1:]
    return SFTExample(ids, mask, p_cut, c_cut)


def encode_sft(row: _Row, tokenizer, *, max_length: int | None, max_prompt_length: int | None,
               chat_template_for_plain: bool = False, completion_only_loss: bool = True) -> SFTExample:
    """Render, tokenize, mask and truncate one validated row (see the module docstring)."""
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token", field="tokenizer")
    ids, mask = _tokenize(_segments(row, tokenizer, chat_template_for_plain), tokenizer)
    ex = truncate_sft(ids, mask, max_length=max_length, max_prompt_length=max_prompt_length)
    if not completion_only_loss:  # loss on every real token, prompt included (still not the first)
        ex.loss_mask = [False] + [True] * (len(ex.ids) - 1)
    return ex


def load_sft_data(sources: list[str] | str, tokenizer, *, max_length: int | None,
                  max_prompt_length: int | None, chat_template_for_plain: bool = False,
                  skip_invalid: bool = False, completion_only_loss: bool = True,
                  split: str = "train") -> tuple[list[SFTExample], DataReport]:
    """Read, validate and tokenize every row of every source before returning.

    Same conventions as ``load_preference_data``: without ``skip_invalid`` the first bad row
    raises; with it, bad rows are skipped and counted per kind (a chat template that cannot
    locate assistant tokens always raises). Zero kept rows raise ``InputError("no valid rows")``.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise InputError("no data sources given", field="data")
    check_lengths(max_length, max_prompt_length)
    examples: list[SFTExample] = []
    report = DataReport()
    for source in sources:
        for where, row in read_records(source, split=split):
            report.rows += 1
            try:
                if isinstance(row, InputError):
                    raise row
                ex = encode_sft(validate_sft_row(row, where), tokenizer, max_length=max_length,
                                max_prompt_length=max_prompt_length,
                                chat_template_for_plain=chat_template_for_plain,
                                completion_only_loss=completion_only_loss)
            except InputError as err:
                if not skip_invalid or err.kind == "chat_template":
                    raise
                report.add_skipped(err)
                continue
            ex.index = len(examples)
            examples.append(ex)
            report.add_kept(ex)
    if not examples:
        detail = f" ({report.summary()})" if report.rows else " (the data are empty)"
        raise InputError("no valid rows" + detail, file=", ".join(map(str, sources)))
    return examples, report
