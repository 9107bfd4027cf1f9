"""Turn a :class:`PreferenceExample` into token ids, following TRL's convention.

* Conversational examples are rendered with ``tokenizer.apply_chat_template``: the prompt
  with ``add_generation_prompt=True``; a completion's text is the render of
  prompt + completion minus the rendered prompt (which must be a prefix of it).
* Plain strings are used as they are, with no template, unless
  ``chat_template_for_plain=True``: then the prompt becomes one user turn rendered with the
  generation prompt, and the completion is appended as raw text.
* Prompt and completions are tokenized *separately* with ``add_special_tokens=False``, so
  no BOS is injected between them (the chat template, if any, supplies its own markers).
* Every completion ends with exactly one EOS (``tokenizer.eos_token_id``): appended unless
  already there. A chat render that ends in ``EOS + whitespace`` (ChatML's
  ``"<|im_end|>\\n"``) is cut right after the EOS, so the completion ends exactly at EOS.

Truncation (applied in this order):

1. ``max_prompt_length``: a longer prompt keeps its END (``prompt_truncated``).
2. ``max_length``: if prompt + the longer completion exceed it, each completion is cut from
   its end to fit (``completion_truncated``; a cut completion loses its EOS). Completions
   keep at least 1 token: if the prompt leaves less room, the prompt is cut further,
   keeping its end, to ``max_length - 1`` tokens (``prompt_truncated``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .preference import PreferenceExample


@dataclass
class EncodedPair:
    """Token ids of one pair (plain Python lists; lengths vary per pair)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool = False
    completion_truncated: bool = False
    index: int = -1  # position in the loaded dataset; keys the reference log-prob cache


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template, so conversational rows cannot be "
                         "rendered", field="chat_template", kind="chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _strip_after_eos(text: str, eos: str | None) -> str:
    """Cut whitespace that follows a final EOS (ChatML's ``"<|im_end|>\\n"``)."""
    if eos and text.rstrip().endswith(eos):
        return text.rstrip()
    return text


def render_texts(ex: PreferenceExample, tokenizer, *,
                 chat_template_for_plain: bool = False) -> tuple[str, str, str]:
    """The ``(prompt, chosen, rejected)`` texts, before tokenization."""
    if not ex.conversational:
        if not chat_template_for_plain:
            return ex.prompt, ex.chosen, ex.rejected
        prompt = _render(tokenizer, [{"role": "user", "content": ex.prompt}],
                         generation_prompt=True)
        return prompt, ex.chosen, ex.rejected
    prompt = _render(tokenizer, ex.prompt, generation_prompt=True)
    completions = []
    for completion in (ex.chosen, ex.rejected):
        full = _render(tokenizer, ex.prompt + completion, generation_prompt=False)
        if not full.startswith(prompt):
            raise InputError(
                "the tokenizer's chat template does not render the prompt (with the generation "
                "prompt) as a prefix of the full conversation, so completions cannot be "
                "separated from the prompt; use a template that renders turns incrementally",
                field="chat_template", kind="chat_template")
        completions.append(_strip_after_eos(full[len(prompt):], tokenizer.eos_token))
    return prompt, completions[0], completions[1]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], *,
             max_length: int | None, max_prompt_length: int | None) -> EncodedPair:
    """Apply the module's truncation rules to already-tokenized ids."""
    p_cut = c_cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, p_cut = prompt[-max_prompt_length:], True
    if max_length is not None and len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if len(prompt) > max_length - 1:
            prompt, p_cut = prompt[len(prompt) - (max_length - 1):], True
        room = max_length - len(prompt)
        c_cut = len(chosen) > room or len(rejected) > room
        chosen, rejected = chosen[:room], rejected[:room]
    return EncodedPair(prompt, chosen, rejected, p_cut, c_cut)


def check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    """InputError unless the limits leave room for a prompt and a completion token."""
    if max_length is not None and max_length < 2:
        raise InputError(f"must be at least 2, got {max_length}", field="max_length")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise InputError(f"must be at least 1, got {max_prompt_length}",
                         field="max_prompt_length")


def encode_preference(ex: PreferenceExample, tokenizer, *, max_length: int | None,
                      max_prompt_length: int | None,
                      chat_template_for_plain: bool = False) -> EncodedPair:
    """Render, tokenize and truncate one example (see the module docstring for the rules).

    Returns an :class:`EncodedPair` whose ``prompt + chosen`` and ``prompt + rejected`` are
    each at most ``max_length`` tokens.
    """
    check_lengths(max_length, max_prompt_length)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise InputError("the tokenizer has no EOS token", field="tokenizer")
    prompt, chosen, rejected = render_texts(ex, tokenizer,
                                            chat_template_for_plain=chat_template_for_plain)
    return truncate(_ids(tokenizer, prompt), _with_eos(_ids(tokenizer, chosen), eos_id),
                    _with_eos(_ids(tokenizer, rejected), eos_id),
                    max_length=max_length, max_prompt_length=max_prompt_length)
