"""K responses per prompt from a model, a batch of prompts at a time: how ``alignkit generate``,
best-of-n, rso, online-dpo, ``alignkit eval`` and the demo sample (``rollout.generate.sample_k``
underneath: KV cache, temperature / top-p / top-k, stop at EOS)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SamplingConfig
from ..data.prompts import PromptItem
from .generate import sample_k


@dataclass
class Responses:
    """One model's responses: per prompt, ``num_responses`` texts and their token ids (EOS kept if sampled)."""

    texts: list[list[str]]
    ids: list[list[list[int]]]
    ended: list[list[bool]]

    def to_rows(self) -> list[dict]:
        return [{"texts": t, "ids": i, "ended": e} for t, i, e in zip(self.texts, self.ids, self.ended)]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "Responses":
        return cls([r["texts"] for r in rows], [r["ids"] for r in rows], [r["ended"] for r in rows])


def sample_prompts(model, tokenizer, prompts: list[PromptItem], sampling: SamplingConfig, *,
                   generator: torch.Generator | None = None, precision: str = "fp32", progress: bool = True,
                   desc: str = "sample") -> Responses:
    """``sampling.num_responses`` responses per prompt, in batches of ``gen_batch_size`` prompts, under
    bf16 autocast for ``precision="bf16"``. ``generator``: the sampling RNG (default: torch's global one)."""
    from tqdm.auto import tqdm

    from ..memory import for_sampling
    from ..precision import warn_if_emulated

    warn_if_emulated(precision)
    k = sampling.num_responses
    texts, ids, ended = [], [], []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    # for_sampling: freed blocks (blocked weights, prefill activations, key/value buffers) reused, not faulted in again
    with for_sampling(), autocast, torch.no_grad(), \
            tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for s in range(0, len(prompts), sampling.gen_batch_size):
            batch = prompts[s:s + sampling.gen_batch_size]
            roll = sample_k(model, [p.ids for p in batch], k, max_new_tokens=sampling.max_new_tokens,
                            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            generator=generator)
            out = roll.texts(tokenizer)
            rows = [r[:n].tolist() for r, n in zip(roll.response_ids, roll.response_lengths.tolist())]
            eos = roll.ended_with_eos.tolist()
            for i in range(len(batch)):
                texts.append(out[i * k:(i + 1) * k])
                ids.append(rows[i * k:(i + 1) * k])
                ended.append(eos[i * k:(i + 1) * k])
            bar.update(len(batch))
    return Responses(texts, ids, ended)
