"""Reward-model data: K-wise rankings (and preference pairs, as K = 2) -> comparisons + token ids.

Row formats (JSONL, JSON, Parquet, CSV or a datasets folder, like every other alignkit data):

* K-wise ranking: ``{"prompt": P, "responses": [R_1, ..., R_K], <order>}`` with 2 <= K <= 9, where
  P is a string or a list of messages (ending with a user turn) and each R_i a string or a list
  with one assistant message; ``<order>`` is one of
    - ``"ranks": [K ints]``: each response's place, 1 = best; equal places are ties;
    - ``"scores": [K numbers]``: higher = better; equal scores are ties;
    - ``"rubric": [K objects]``: the labeler's table per response (``alignkit.rubric``), turned into
      a score by the configurable rubric rule; equal scores are ties.
  If several are given, ``ranks`` decides the order, then ``scores``, then ``rubric``.
* preference pair, any TRL format (``prompt``/``chosen``/``rejected``, conversational, implicit
  prompt): K = 2, chosen first; an optional ``"margin"`` column is used as the pair's margin.

Comparisons: every (i, j) with i ranked strictly better than j; ties give none, and a row whose
responses are all tied is refused. Margins (Llama 2's margin loss): ``margin_scale`` x the score gap
for ``scores`` and ``rubric`` rows, 0 for ``ranks`` rows, the row's ``margin`` for pairs.

Tokenisation follows ``data/tokenize.py`` (TRL's convention): plain strings as they are (or the
prompt as one templated user turn with ``chat_template_for_plain``), conversations through the chat
template, each response ends with EOS; ``max_prompt_length`` keeps the END of the prompt and
``max_length`` cuts responses from their end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .. import rubric
from ..errors import InputError
from .preference import PreferenceExample, _check_completion, _check_prompt, _Ctx, _messages, validate_preference_row
from .readers import read_records
from .report import DataReport
from .tokenize import _ids, _render, _strip_after_eos, _with_eos, check_lengths

K_MIN, K_MAX = 2, 9
ORDER_FIELDS = ("ranks", "scores", "rubric")


@dataclass(frozen=True)
class RankingExample:
    """One validated prompt with K responses and the comparisons among them."""

    prompt: Any                                   # str, or a list of messages
    responses: list                               # K strings, or K lists of one assistant message
    conversational: bool
    comparisons: list[tuple[int, int, float]]     # (better i, worse j, margin)


@dataclass
class EncodedRanking:
    """Token ids of one prompt and its K responses (each ends with EOS unless truncated)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    comparisons: list[tuple[int, int, float]]
    prompt_truncated: bool = False
    completion_truncated: bool = False
    index: int = -1
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- validation

def validate_ranking_row(row: Any, where: tuple[str, int], *, weights: dict[str, float] | None = None,
                         margin_scale: float = 0.0) -> RankingExample:
    """A raw row -> RankingExample; every problem is an InputError naming file, line and field."""
    ctx = _Ctx(where)
    if isinstance(row, dict) and "responses" not in row and ("chosen" in row or "rejected" in row):
        return _from_pair(validate_preference_row(row, where))
    if not isinstance(row, dict):
        raise ctx.error(f"expected an object, got {type(row).__name__}", "row", "wrong_type")
    prompt, conversational = _prompt(row.get("prompt"), ctx)
    responses = _responses(row.get("responses"), conversational, ctx)
    k = len(responses)
    order = next((name for name in ORDER_FIELDS if row.get(name) is not None), None)
    if order is None:
        raise ctx.error("missing: a K-wise row needs 'ranks', 'scores' or 'rubric' (one per response)",
                        "ranks", "missing_field")
    values = _order_values(row[order], order, k, ctx, weights)
    comparisons = []
    for i in range(k):
        for j in range(k):
            better = values[i] < values[j] if order == "ranks" else values[i] > values[j]
            if better:
                gap = 0.0 if order == "ranks" else margin_scale * (values[i] - values[j])
                comparisons.append((i, j, gap))
    if not comparisons:
        raise ctx.error(f"all {k} responses are tied: nothing to compare", order, "no_comparisons")
    return RankingExample(prompt, responses, conversational, comparisons)


def _from_pair(ex: PreferenceExample) -> RankingExample:
    return RankingExample(ex.prompt, [ex.chosen, ex.rejected], ex.conversational, [(0, 1, ex.margin or 0.0)])


def _prompt(value: Any, ctx: _Ctx) -> tuple[Any, bool]:
    if value is None:
        raise ctx.error("missing", "prompt", "missing_field")
    if isinstance(value, str):
        if not value.strip():
            raise ctx.error("is empty", "prompt", "missing_field")
        return value, False
    messages = _messages(value, "prompt", ctx)
    _check_prompt(messages, "prompt", ctx)
    return messages, True


def _responses(value: Any, conversational: bool, ctx: _Ctx, k_range: tuple[int, int] = (K_MIN, K_MAX),
               field: str = "responses") -> list:
    if not isinstance(value, list):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise ctx.error(f"must be a list of {k_range[0]} to {k_range[1]} responses, got {got}", field,
                        "missing_field" if value is None else "wrong_type")
    if not k_range[0] <= len(value) <= k_range[1]:
        raise ctx.error(f"needs {k_range[0]} to {k_range[1]} responses (K), got {len(value)}", field, "bad_k")
    out = []
    for i, r in enumerate(value):
        name = f"{field}[{i}]" if field == "responses" else field
        if isinstance(r, str):
            if not r.strip():
                raise ctx.error("is empty", name, "empty_completion")
            out.append([{"role": "assistant", "content": r}] if conversational else r)
        elif isinstance(r, list) and conversational:
            msgs = _messages(r, name, ctx)
            _check_completion(msgs, name, 0, ctx)
            out.append(msgs)
        else:
            expected = "a string or a list with one assistant message" if conversational else "a string"
            raise ctx.error(f"must be {expected}, got {type(r).__name__}", name, "wrong_type")
    for i in range(len(out)):
        for j in range(i):
            if out[i] == out[j]:
                raise ctx.error(f"is identical to {field}[{j}]", f"{field}[{i}]", "identical_pair")
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, str):  # CSV cells
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _order_values(value: Any, order: str, k: int, ctx: _Ctx, weights) -> list[float]:
    if not isinstance(value, list):
        raise ctx.error(f"must be a list with one entry per response (K = {k}), got {type(value).__name__}",
                        order, "wrong_type")
    if len(value) != k:
        raise ctx.error(f"has {len(value)} entries but there are {k} responses", order, "wrong_length")
    if order == "rubric":
        return [rubric.rubric_score(rubric.validate_labels(v, f"rubric[{i}]", (ctx.file, ctx.line)), weights)
                for i, v in enumerate(value)]
    out = []
    for i, v in enumerate(value):
        x = _number(v)
        if order == "ranks" and (x is None or x != int(x) or not 1 <= x <= k):
            raise ctx.error(f"must be a place from 1 to {k} (1 = best), got {v!r}", f"ranks[{i}]", "bad_rank")
        if x is None:
            raise ctx.error(f"must be a finite number, got {v!r}", f"scores[{i}]", "wrong_type")
        out.append(x)
    return out


# ----------------------------------------------------------------------------- tokenisation

def _render_all(ex: RankingExample, tokenizer, chat_template_for_plain: bool) -> tuple[str, list[str]]:
    if not ex.conversational:
        prompt = ex.prompt if not chat_template_for_plain else \
            _render(tokenizer, [{"role": "user", "content": ex.prompt}], generation_prompt=True)
        return prompt, list(ex.responses)
    prompt = _render(tokenizer, ex.prompt, generation_prompt=True)
    texts = []
    for r in ex.responses:
        full = _render(tokenizer, ex.prompt + r, generation_prompt=False)
        if not full.startswith(prompt):
            raise InputError("the tokenizer's chat template does not render the prompt (with the generation prompt) "
                             "as a prefix of the full conversation", field="chat_template", kind="chat_template")
        texts.append(_strip_after_eos(full[len(prompt):], tokenizer.eos_token))
    return prompt, texts


def encode_ranking(ex: RankingExample, tokenizer, *, max_length: int | None, max_prompt_length: int | None,
                   chat_template_for_plain: bool = False) -> EncodedRanking:
    """Render, tokenize and truncate (same rules as ``encode_preference``, for K responses)."""
    check_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token", field="tokenizer")
    prompt_text, texts = _render_all(ex, tokenizer, chat_template_for_plain)
    prompt = _ids(tokenizer, prompt_text)
    responses = [_with_eos(_ids(tokenizer, t), tokenizer.eos_token_id) for t in texts]
    p_cut = c_cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, p_cut = prompt[-max_prompt_length:], True
    if max_length is not None and len(prompt) + max(map(len, responses)) > max_length:
        if len(prompt) > max_length - 1:
            prompt, p_cut = prompt[len(prompt) - (max_length - 1):], True
        room = max_length - len(prompt)
        c_cut = any(len(r) > room for r in responses)
        responses = [r[:room] for r in responses]
    return EncodedRanking(prompt, responses, list(ex.comparisons), p_cut, c_cut)


def load_ranking_data(sources: list[str] | str, tokenizer, *, max_length: int | None, max_prompt_length: int | None,
                      chat_template_for_plain: bool = False, skip_invalid: bool = False,
                      weights: dict[str, float] | None = None, margin_scale: float = 0.0,
                      split: str = "train") -> tuple[list[EncodedRanking], DataReport]:
    """Read, validate and tokenize every row before returning (see ``load_preference_data``)."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise InputError("no data sources given", field="data")
    check_lengths(max_length, max_prompt_length)
    out: list[EncodedRanking] = []
    report = DataReport()
    for source in sources:
        for where, row in read_records(source, split=split):
            report.rows += 1
            try:
                if isinstance(row, InputError):
                    raise row
                ex = validate_ranking_row(row, where, weights=weights, margin_scale=margin_scale)
                enc = encode_ranking(ex, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                     chat_template_for_plain=chat_template_for_plain)
            except InputError as err:
                if not skip_invalid or err.kind == "chat_template":
                    raise
                report.add_skipped(err)
                continue
            enc.index = len(out)
            out.append(enc)
            report.add_kept(enc)
    if not out:
        detail = f" ({report.summary()})" if report.rows else " (the data are empty)"
        raise InputError("no valid rows" + detail, file=", ".join(map(str, sources)))
    return out, report
