"""`alignkit score`: score responses with a reward model and write them as JSONL.

Input rows (any alignkit data format; plain strings or conversations, as for `alignkit rm`):

* ``{"prompt", "response"}`` -> the row plus ``"score"``;
* ``{"prompt", "responses": [K]}`` (ranks/scores/rubric optional) -> the row plus ``"reward_scores": [K]``;
* a preference pair ``{"prompt", "chosen", "rejected"}`` -> the row plus ``"chosen_score"``, ``"rejected_score"``.

Every row is validated before the model loads (bad input: exit 2 naming file, line and field; no
output written). Sequences are scored in batches sorted by length (less padding), and written in
input order to a temporary file renamed into place at the end, so ``--output`` is never half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ScoreConfig
from .data.preference import _Ctx, validate_preference_row
from .data.ranking import RankingExample, _prompt, _responses, encode_ranking
from .data.readers import read_records
from .errors import InputError
from .models import load_tokenizer
from .reward_model import load_reward_model, reward_scores, set_reward_pad_token

MAX_RESPONSES = 64  # per row; scoring is not limited to the K <= 9 of ranking data


def _example(row, where) -> tuple[RankingExample, str]:
    """(the prompt with its responses, which output key) for one input row."""
    ctx = _Ctx(where)
    if not isinstance(row, dict):
        raise ctx.error(f"expected an object, got {type(row).__name__}", "row", "wrong_type")
    if "chosen" in row or "rejected" in row:
        ex = validate_preference_row(row, where)
        return RankingExample(ex.prompt, [ex.chosen, ex.rejected], ex.conversational, []), "pair"
    prompt, conversational = _prompt(row.get("prompt"), ctx)
    if "responses" in row:
        responses = _responses(row["responses"], conversational, ctx, k_range=(1, MAX_RESPONSES))
        return RankingExample(prompt, responses, conversational, []), "many"
    if row.get("response") is None:
        raise ctx.error("missing: a row needs 'response', 'responses' or 'chosen'/'rejected'", "response",
                        "missing_field")
    single = _responses([row["response"]], conversational, ctx, k_range=(1, 1), field="response")
    return RankingExample(prompt, single, conversational, []), "one"


def run_score(cfg: ScoreConfig) -> Path:
    """Score every row of ``cfg.data`` and write ``cfg.output``. Returns the output path."""
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise InputError("exists; pass --overwrite to replace it", file=str(out), field="output")
    tokenizer = load_tokenizer(cfg.reward_model, trust_remote_code=cfg.trust_remote_code)
    rows, encoded, kinds = [], [], []
    for source in cfg.data:
        for where, row in read_records(source):
            if isinstance(row, InputError):
                raise row
            ex, kind = _example(row, where)
            encoded.append(encode_ranking(ex, tokenizer, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length,
                                          chat_template_for_plain=cfg.chat_template_for_plain))
            rows.append(row)
            kinds.append(kind)
    if not rows:
        raise InputError("no rows to score", file=", ".join(cfg.data), field="data")

    model = load_reward_model(cfg.reward_model, trust_remote_code=cfg.trust_remote_code).eval()
    pad = set_reward_pad_token(model, tokenizer)
    seqs = [(r, k, enc.prompt_ids + resp) for r, enc in enumerate(encoded) for k, resp in enumerate(enc.response_ids)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]))
    scores: dict[tuple[int, int], float] = {}
    from tqdm.auto import tqdm

    from .precision import warn_if_emulated

    warn_if_emulated(cfg.precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    with torch.no_grad(), autocast, tqdm(total=len(seqs), desc="score", unit="seq", disable=not cfg.progress) as bar:
        for s in range(0, len(order), cfg.batch_size):
            chunk = [seqs[i] for i in order[s:s + cfg.batch_size]]
            width = max(len(ids) for _, _, ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for n, (_, _, ids) in enumerate(chunk):
                input_ids[n, :len(ids)] = torch.tensor(ids)
                mask[n, :len(ids)] = 1
            for (r, k, _), v in zip(chunk, reward_scores(model, input_ids, mask).tolist()):
                scores[(r, k)] = v
            bar.update(len(chunk))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for r, (row, kind) in enumerate(zip(rows, kinds)):
                got = [scores[(r, k)] for k in range(len(encoded[r].response_ids))]
                extra = {"one": lambda: {"score": got[0]}, "many": lambda: {"reward_scores": got},
                         "pair": lambda: {"chosen_score": got[0], "rejected_score": got[1]}}[kind]()
                f.write(json.dumps({**row, **extra}, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
