"""Rollout layer: hand-written KV-cache sampling into a Rollout, and the judges that score it."""

from __future__ import annotations

import copy
import math
import textwrap

import pytest
import torch
from conftest import make_tiny_llama

from alignkit.errors import InputError
from alignkit.rollout import llama_decode
from alignkit.rollout import (
    FunctionJudge,
    Judge,
    RewardModelJudge,
    Rollout,
    eos_penalty,
    filter_logits,
    generate,
    load_judge,
    sample_k,
)

PROMPTS = ["Hello there", "What is the capital of France? Answer briefly please.", "Tell me a joke"]


@pytest.fixture(scope="module")
def policy():
    """A tiny random Llama with a sharpened LM head: logits with std ~3, so argmaxes are clear
    (no near-ties between the cached and uncached paths) and samples depend on the seed."""
    from alignkit.embedded import load_embedded_tokenizer

    model = make_tiny_llama(len(load_embedded_tokenizer()))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def prompt_ids():
    from alignkit.embedded import load_embedded_tokenizer

    tok = load_embedded_tokenizer()
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def _unused_id(*tensors) -> int:
    """A token id that none of the tensors hold: an EOS that never fires."""
    used = set(torch.cat([t.reshape(-1) for t in tensors]).tolist())
    return next(i for i in range(3, 1000) if i not in used)


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


@torch.no_grad()
def _greedy_without_cache(model, prompt_ids, steps: int, pad: int) -> torch.Tensor:
    """Reference decoder: a full forward over prompt + tokens so far at every step, no KV cache."""
    seqs = [list(p) for p in prompt_ids]
    out = []
    for _ in range(steps):
        ids, mask = _left_pad(seqs, pad)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                       use_cache=False).logits[:, -1]
        nxt = logits.argmax(-1)
        out.append(nxt)
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------- generation

def test_kv_cache_greedy_matches_full_reforward(policy, prompt_ids):
    """Left-padded batch of 3 prompts (4, 11, 4 tokens): the cached decoder picks exactly the tokens
    of a decoder that re-runs the whole sequence each step."""
    assert len({len(p) for p in prompt_ids}) > 1
    ref = _greedy_without_cache(policy, prompt_ids, 8, pad=0)
    eos = _unused_id(ref)
    r = generate(policy, prompt_ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, greedy=True)
    assert torch.equal(r.response_ids, ref)
    assert r.response_mask.all() and not r.ended_with_eos.any()
    assert r.response_lengths.tolist() == [8, 8, 8]


def test_generation_under_bf16_autocast(policy, prompt_ids):
    """--precision bf16 samples under autocast: the KV cache must take the keys' changing dtype (a
    StaticCache typed by the prefill refused the decoding steps' bf16 keys), and greedy decoding under
    autocast equals the no-cache decoder run under the same autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _greedy_without_cache(policy, prompt_ids, 6, pad=0)
        r = generate(policy, prompt_ids, max_new_tokens=6, eos_token_id=_unused_id(ref), pad_token_id=0, greedy=True)
        sampled = generate(policy, prompt_ids, max_new_tokens=6, temperature=1.0, eos_token_id=_unused_id(ref),
                           pad_token_id=0)
    assert torch.equal(r.response_ids, ref)
    assert sampled.logprobs.dtype == torch.float32 and torch.isfinite(sampled.logprobs).all()


def _tiny_gpt2(vocab: int):
    """Learned ABSOLUTE positions: unlike RoPE (relative, so a constant shift of positions changes
    nothing), a wrong position for a left-padded row changes its output here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                     eos_token_id=2, pad_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0, 1.0)  # positions that matter
        model.lm_head.weight.mul_(20.0)  # tied with wte: sharpens the logits
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_prompt_continues_as_alone(policy, prompt_ids, arch):
    if arch == "gpt2":
        policy = _tiny_gpt2(policy.config.vocab_size)
    batch = generate(policy, prompt_ids, max_new_tokens=6, eos_token_id=_unused_id(torch.tensor(0)),
                     pad_token_id=0, greedy=True)
    for i, p in enumerate(prompt_ids):
        alone = generate(policy, [p], max_new_tokens=6, eos_token_id=_unused_id(torch.tensor(0)),
                         pad_token_id=0, greedy=True)
        assert alone.prompt_mask.all()
        assert torch.equal(batch.response_ids[i], alone.response_ids[0])
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_fresh_forward(policy, prompt_ids, temperature):
    """Stored log-probs = log_softmax(logits / temperature) of a fresh full forward over prompt +
    response, taken BEFORE top-k/top-p filtering; 0 on padding."""
    eos = 2
    g = torch.Generator().manual_seed(0)
    r = generate(policy, prompt_ids, max_new_tokens=10, temperature=temperature, top_k=50, top_p=0.9,
                 eos_token_id=eos, pad_token_id=0, generator=g)
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    with torch.no_grad():
        logits = policy(input_ids=r.full_ids(), attention_mask=r.full_mask(), position_ids=r.position_ids(),
                        use_cache=False).logits  # (B, P+T, V)
    logp = torch.log_softmax(logits[:, P - 1:P + T - 1] / temperature, -1)
    expected = logp.gather(2, r.response_ids[..., None]).squeeze(2) * r.response_mask
    torch.testing.assert_close(r.logprobs, expected, atol=2e-5, rtol=0)
    assert (r.logprobs[r.response_mask == 0] == 0).all()
    assert (r.logprobs[r.response_mask == 1] < 0).all()
    # top-k 50: every sampled token is among the 50 largest logits of its step
    ranks = (logits[:, P - 1:P + T - 1] > logits[:, P - 1:P + T - 1].gather(2, r.response_ids[..., None])).sum(-1)
    assert (ranks[r.response_mask == 1] < 50).all()


def test_rows_stop_at_eos(policy, prompt_ids):
    """EOS := a token row 0 emits greedily at step 3. Every row stops at its first EOS: the EOS is
    its last real token, later positions are pad with mask 0 and log-prob 0."""
    free = generate(policy, prompt_ids, max_new_tokens=12, eos_token_id=_unused_id(torch.tensor(0)),
                    pad_token_id=0, greedy=True)
    eos = int(free.response_ids[0, 2])
    pad = _unused_id(free.response_ids)
    r = generate(policy, prompt_ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad, greedy=True)
    assert r.ended_with_eos[0] and r.response_lengths[0] <= 3
    for i in range(len(prompt_ids)):
        row = free.response_ids[i].tolist()
        n = row.index(eos) + 1 if eos in row else 12
        assert r.response_lengths[i] == n and bool(r.ended_with_eos[i]) == (eos in row)
        assert r.response_mask[i].tolist() == [1] * n + [0] * (r.response_ids.shape[1] - n)
        assert r.response_ids[i, :n].tolist() == row[:n]
        assert (r.response_ids[i, n:] == pad).all() and (r.logprobs[i, n:] == 0).all()
        torch.testing.assert_close(r.logprobs[i, :n], free.logprobs[i, :n], atol=1e-5, rtol=0)
    # T is the steps run: all rows finished early here, or the horizon
    assert r.response_ids.shape[1] == (12 if not r.ended_with_eos.all() else int(r.response_lengths.max()))


def test_all_rows_finished_stops_early(policy, prompt_ids):
    """Every row's first greedy token as (several) EOS ids: one step and done."""
    first = generate(policy, prompt_ids, max_new_tokens=1, eos_token_id=_unused_id(torch.tensor(0)),
                     pad_token_id=0, greedy=True).response_ids[:, 0]
    r = generate(policy, prompt_ids, max_new_tokens=20, eos_token_id=sorted(set(first.tolist())),
                 pad_token_id=0, greedy=True)
    assert r.response_ids.shape == (3, 1) and r.ended_with_eos.all() and r.response_lengths.tolist() == [1, 1, 1]


def test_generator_seed_reproducible(policy, prompt_ids):
    def run(seed):
        return generate(policy, prompt_ids, max_new_tokens=8, eos_token_id=2, pad_token_id=0,
                        generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_top_k_1_equals_greedy(policy, prompt_ids):
    eos = _unused_id(torch.tensor(0))
    greedy = generate(policy, prompt_ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, greedy=True)
    k1 = generate(policy, prompt_ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, top_k=1,
                  generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy.response_ids, k1.response_ids)


def test_top_p_golden():
    """probs (0.5, 0.3, 0.15, 0.05). Ascending cumulative mass: 0.05, 0.20, 0.50, 1.00; a token
    goes when that mass <= 1 - p. p=0.75 -> {0.5, 0.3} (0.8 >= 0.75, and 0.5 alone is not);
    p=0.81 -> three tokens; p=0.4 -> {0.5}; tiny p -> still the top token; p=1 -> all."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist() for p in (0.75, 0.81, 0.4, 1e-9, 1.0)}
    assert kept[0.75] == [True, True, False, False]
    assert kept[0.81] == [True, True, True, False]
    assert kept[0.4] == [True, False, False, False]
    assert kept[1e-9] == [True, False, False, False]
    assert kept[1.0] == [True] * 4
    filtered = filter_logits(logits, top_p=0.75)
    torch.testing.assert_close(filtered.softmax(-1), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.isfinite(filter_logits(logits, top_k=2))[0].tolist() == [True, True, False, False]
    # exact boundary: 4 equal tokens (mass 0.25 each, exact in binary); p = 0.5 is met by exactly 2
    uniform = torch.zeros(1, 4)
    assert [int(torch.isfinite(filter_logits(uniform, top_p=p)).sum()) for p in (0.5, 0.75, 0.76)] == [2, 3, 4]


def test_filter_matches_hf_warpers():
    from transformers.generation.logits_process import (
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    z = torch.randn(4, 500, generator=torch.Generator().manual_seed(0)) * 3
    for k, p in [(0, 0.9), (20, 1.0), (40, 0.7), (0, 0.3)]:
        ref = z.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        ref = TopPLogitsWarper(p)(None, ref) if p < 1 else ref
        assert torch.equal(torch.isfinite(filter_logits(z, top_k=k, top_p=p)), torch.isfinite(ref))


def test_sample_k_repeats_contiguously(policy, prompt_ids):
    r = sample_k(policy, prompt_ids[:2], 3, max_new_tokens=4, eos_token_id=2, pad_token_id=0,
                 generator=torch.Generator().manual_seed(0))
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(6):
        assert r.prompt_ids[i][r.prompt_mask[i].bool()].tolist() == prompt_ids[i // 3]
    assert len({tuple(x) for x in r.response_ids[:3].tolist()}) > 1  # the k samples differ


def test_rollout_helpers_and_no_pad_token(policy, prompt_ids, tokenizer):
    """full_ids/full_mask concatenate; texts() drops the EOS; a config without pad id pads with EOS;
    the model's train mode is restored."""
    policy.config.pad_token_id = None
    policy.train()
    try:
        r = generate(policy, prompt_ids, max_new_tokens=5, eos_token_id=tokenizer.eos_token_id,
                     generator=torch.Generator().manual_seed(0))
        assert policy.training
    finally:
        policy.config.pad_token_id = 2
        policy.eval()
    assert isinstance(r, Rollout) and len(r) == 3
    assert (r.prompt_ids[r.prompt_mask == 0] == tokenizer.eos_token_id).all()
    P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
    assert r.full_ids().shape == r.full_mask().shape == (3, P + T)
    assert torch.equal(r.full_ids()[:, P:], r.response_ids) and torch.equal(r.full_mask()[:, :P], r.prompt_mask)
    ids = r.response_ids.clone()
    ids[0, 1] = tokenizer.eos_token_id  # an EOS is a special token: texts() leaves it out
    r.response_ids = ids
    texts = r.texts(tokenizer)
    assert texts[1] == tokenizer.decode(ids[1, :r.response_lengths[1]].tolist(), skip_special_tokens=True)
    assert tokenizer.eos_token not in texts[0]


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k")])
def test_bad_sampling_arguments(policy, prompt_ids, kwargs, field):
    args = {"max_new_tokens": 2, "eos_token_id": 2, "pad_token_id": 0, **kwargs}
    with pytest.raises(InputError) as e:
        generate(policy, prompt_ids, **args)
    assert e.value.field == field
    with pytest.raises(InputError, match="prompt 1 has no tokens"):
        generate(policy, [[5], []], max_new_tokens=2, eos_token_id=2)


# ----------------------------------------------------------------------------- function judges

REWARD_SRC = textwrap.dedent('''
    import math

    def length(prompt, response):
        return float(len(response))

    def batched(prompts, responses):
        return [len(p) + len(r) for p, r in zip(prompts, responses)]
    batched.batched = True

    def bad_string(prompt, response):
        return "high"

    def bad_nan(prompt, response):
        return math.nan

    def bad_length(prompts, responses):
        return [1.0]
    bad_length.batched = True

    NOT_CALLABLE = 3
''')


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_SRC)
    return path


def test_function_judge_from_file_and_module(reward_file, monkeypatch):
    judge = FunctionJudge(f"{reward_file}:length")
    assert isinstance(judge, Judge)
    scores = judge(["p", "q"], ["abc", "hello"])
    assert scores.dtype == torch.float32 and scores.tolist() == [3.0, 5.0]
    monkeypatch.syspath_prepend(str(reward_file.parent))
    judge = load_judge("my_rewards:batched")
    assert isinstance(judge, FunctionJudge) and judge.batched
    assert judge(["ab", "c"], ["xyz", ""]).tolist() == [5.0, 1.0]


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "must be 'package.module:function'"),
    ("{dir}/missing.py:length", "reward function file not found"),
    ("alignkit_no_such_module_xyz:reward", "reward function module not found: alignkit_no_such_module_xyz"),
    ("{file}:nope", "has no attribute 'nope'"),
    ("{file}:NOT_CALLABLE", "is not callable"),
    ("{file}:", "missing ':function'"),
])
def test_function_judge_bad_specs(reward_file, spec, message):
    spec = spec.format(dir=reward_file.parent, file=reward_file)
    with pytest.raises(InputError) as e:
        FunctionJudge(spec)
    assert message in str(e.value)
    assert e.value.field == "reward_model" and spec in str(e.value)


def test_function_judge_broken_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def reward(p, r):\n    return (\n")
    with pytest.raises(InputError, match="importing .*broken.py failed: SyntaxError"):
        FunctionJudge(f"{path}:reward")


@pytest.mark.parametrize("name, message", [
    ("bad_string", "returned 'high' (a str) for response 0; expected a number"),
    ("bad_nan", "returned nan for response 0; expected a finite number"),
    ("bad_length", "returned 1 scores for 2 responses"),
])
def test_function_judge_bad_returns(reward_file, name, message):
    judge = FunctionJudge(f"{reward_file}:{name}")
    with pytest.raises(InputError) as e:
        judge(["p", "q"], ["a", "b"])
    assert message in str(e.value) and f"{reward_file}:{name}" in str(e.value)
    assert e.value.field == "reward_model"


def test_eos_penalty():
    scores = torch.tensor([1.0, 2.0, -0.5])
    ended = torch.tensor([True, False, False])
    assert eos_penalty(scores, ended, -1.0).tolist() == [1.0, 1.0, -1.5]
    assert torch.equal(eos_penalty(scores, ended, 0.0), scores)
    with pytest.raises(InputError, match="must be <= 0"):
        eos_penalty(scores, ended, 1.0)


# ----------------------------------------------------------------------------- reward-model judges

@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny reward model as `alignkit rm` leaves it: a sequence classifier (random head) with a pad
    id distinct from EOS, saved with its tokenizer."""
    from alignkit.embedded import load_embedded_tokenizer
    from alignkit.reward_model import load_reward_model, set_reward_pad_token

    tok = load_embedded_tokenizer()
    base = tmp_path_factory.mktemp("lm")
    make_tiny_llama(len(tok), seed=3).save_pretrained(base)
    tok.save_pretrained(base)
    rm = load_reward_model(str(base))
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # scores of order 1, so a wrong token shows
    set_reward_pad_token(rm, tok)
    out = tmp_path_factory.mktemp("rm")
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("chat_template", [False, True])
def test_reward_model_judge_matches_reward_scores(reward_dir, tokenizer, chat_template):
    """Batched, length-sorted, padded judge scores = reward_scores on each unpadded prompt + response +
    EOS, tokenised independently here (plain, or the prompt as one templated user turn)."""
    from alignkit.reward_model import reward_scores

    judge = load_judge(str(reward_dir), batch_size=2, chat_template=chat_template)
    assert isinstance(judge, RewardModelJudge) and judge.pad_token_id != tokenizer.eos_token_id
    responses = ["Paris.", "A long answer that goes on for quite a few words more than the others", "Hi", ""]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    got = judge(prompts, responses)
    expected = []
    for p, r in zip(prompts, responses):
        if chat_template:
            p = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True)
        ids = tokenizer(p, add_special_tokens=False)["input_ids"] + \
            tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            expected.append(reward_scores(judge.model, torch.tensor([ids]), torch.ones(1, len(ids))).item())
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)
    assert got.std() > 0.01  # the scores differ: a mix-up of rows would show


@pytest.mark.parametrize("trained_with_template", [False, True])
def test_reward_model_judge_renders_prompts_as_the_model_was_trained(reward_dir, tmp_path, trained_with_template):
    """chat_template / max_prompt_length unset: read from the config.yaml `alignkit rm` saved, so a reward
    model trained on templated prompts is judged on templated prompts (explicit arguments still win)."""
    import shutil

    folder = tmp_path / "rm"
    shutil.copytree(reward_dir, folder)
    (folder / "config.yaml").write_text(f"data:\n  chat_template_for_plain: {str(trained_with_template).lower()}\n"
                                        "  max_prompt_length: 7\n")
    judge = load_judge(str(folder))
    assert judge.chat_template is trained_with_template and judge.max_prompt_length == 7
    explicit = load_judge(str(folder), chat_template=not trained_with_template, max_prompt_length=64)
    assert explicit.chat_template is (not trained_with_template) and explicit.max_prompt_length == 64
    prompts, responses = [PROMPTS[0], PROMPTS[1]], ["Paris.", "Four."]
    same = load_judge(str(reward_dir), chat_template=trained_with_template, max_prompt_length=7)
    torch.testing.assert_close(judge(prompts, responses), same(prompts, responses), rtol=0, atol=0)
    (folder / "config.yaml").write_text("data: [not, a, mapping\n")  # unreadable: the defaults
    judge = load_judge(str(folder))
    assert judge.chat_template is False and judge.max_prompt_length is None


def test_reward_model_judge_tokenizer_choice(reward_dir, tmp_path, tokenizer):
    """The folder's own tokenizer beats a (policy) tokenizer passed along; a folder without one uses
    the given tokenizer (a copy: the caller's pad token is left alone), or refuses without it."""
    import shutil

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_policy_token>"])
    judge = load_judge(str(reward_dir), tokenizer=other)
    assert len(judge.tokenizer) == len(tokenizer)
    bare = tmp_path / "bare-rm"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(reward_dir / name, bare / name)
    pad_before = tokenizer.pad_token
    assert load_judge(str(bare), tokenizer=tokenizer)(["a"], ["b"]).shape == (1,)
    assert tokenizer.pad_token == pad_before
    with pytest.raises(InputError, match="holds no tokenizer"):
        load_judge(str(bare))


def test_reward_model_judge_refuses_a_causal_lm(tiny_model_dir):
    with pytest.raises(InputError, match="is not a reward model folder") as e:
        load_judge(str(tiny_model_dir))
    assert e.value.field == "reward_model"


def test_rollout_to_judge_pipeline(policy, prompt_ids, reward_file, tokenizer):
    """generate -> texts -> judge -> EOS penalty, end to end on the tiny policy."""
    r = generate(policy, prompt_ids, max_new_tokens=4, eos_token_id=tokenizer.eos_token_id,
                 generator=torch.Generator().manual_seed(0))
    scores = load_judge(f"{reward_file}:length")(PROMPTS, r.texts(tokenizer))
    shaped = eos_penalty(scores, r.ended_with_eos, -1.0)
    assert shaped.shape == (3,) and all(math.isfinite(x) for x in shaped.tolist())
    assert torch.equal(shaped, scores - (~r.ended_with_eos).float())


def test_inverse_cdf_sampler_matches_the_softmax_and_never_picks_a_filtered_token():
    """20 000 draws from softmax([2, 1, 0, -inf, 0.5]): each frequency within 5 binomial standard
    deviations (<= 0.017 here) of its probability; the -inf token (p = 0) is never drawn."""
    from alignkit.rollout.generate import _sample

    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), 0.5]]).repeat(20_000, 1)
    draws = _sample(logits, torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    p = torch.softmax(logits[0].double(), -1)
    assert freq[3] == 0
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / len(draws)).sqrt() + 1e-12), (freq, p)


def test_sampler_falls_back_when_the_scaled_draw_rounds_up_to_the_total(monkeypatch):
    """u * total == total (a uniform draw that rounded up; forced here with u = 1) makes searchsorted
    answer V; the sampler then gives the last token with probability > 0, never a zero-probability
    tail token nor an out-of-range id. Rows whose draw is ordinary are untouched."""
    import importlib

    gen_mod = importlib.import_module("alignkit.rollout.generate")  # the module; the package re-exports the function
    weights = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    draws = torch.tensor([[1.0], [0.1], [1.0]])
    monkeypatch.setattr(gen_mod.torch, "rand", lambda *a, **k: draws.clone())
    assert gen_mod._sample_weights(weights.clone(), None).tolist() == [1, 0, 3]
    monkeypatch.setattr(gen_mod.torch, "rand", lambda *a, **k: torch.full((3, 1), 0.5))
    assert gen_mod._sample_weights(weights.clone(), None).tolist() == [1, 2, 2]


@pytest.mark.parametrize("shape", [(8, 1, 24), (3, 24), (5, 8, 24)])  # 8 and 3 rows: the (W h^T)^T path; 40: F.linear
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_rows_linear_equals_linear(shape, with_bias):
    """The (W h^T)^T decode product equals F.linear in float64 to rounding, in both of its paths,
    for 2-D and 3-D inputs, and returns a contiguous (..., V) tensor."""
    from alignkit.rollout.generate import FEW_ROWS, few_rows_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(50, 24, generator=g, dtype=torch.float64)
    b = torch.randn(50, generator=g, dtype=torch.float64) if with_bias else None
    assert (x.numel() // 24 <= FEW_ROWS) == (shape != (5, 8, 24))
    out = few_rows_linear(x, w, b)
    assert out.shape == (*shape[:-1], 50) and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prepack", [True, False])
def test_generate_puts_the_linears_back(policy, prompt_ids, monkeypatch, prepack):
    """During decoding every linear layer and the head run the decode product (oneDNN's on prepacked
    weights, or few_rows_linear); afterwards (also after an error in the loop) they are plain
    nn.Linear again. Under bf16 autocast only the prepacked product is used. A layer whose forward an
    instance already replaced is left alone."""
    import importlib

    gen_mod = importlib.import_module("alignkit.rollout.generate")  # the module; the package re-exports the function
    monkeypatch.setattr(gen_mod, "PREPACK", prepack)
    monkeypatch.setattr(llama_decode, "ENABLED", False)  # a Llama would decode through llama_decode instead
    head = policy.get_output_embeddings()
    linears = [m for m in policy.modules() if isinstance(m, torch.nn.Linear)]
    seen = []
    name = "prepacked_linear" if prepack else "few_rows_linear"
    orig = getattr(gen_mod, name)
    monkeypatch.setattr(gen_mod, name, lambda x, *args, **kw: seen.append(x.shape) or orig(x, *args, **kw))
    generate(policy, prompt_ids, max_new_tokens=3, eos_token_id=_unused_id(torch.tensor([0])), greedy=True)
    assert len(seen) == 3 * len(linears)  # prefill, 2 steps: every linear each time
    # one position per row: the 2 decode steps' every linear, and the head at the prefill's last position
    assert sum(shape[:2] == (3, 1) for shape in seen) == 2 * len(linears) + 1
    assert not any("forward" in vars(m) for m in linears)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 prepacked copy; (W h^T)^T was slower there: F.linear
        generate(policy, prompt_ids, max_new_tokens=3, eos_token_id=_unused_id(torch.tensor([0])), greedy=True)
    # where oneDNN cannot block bf16 weights on this CPU (AVX2 only), bf16 keeps F.linear as well
    assert len(seen) == (3 * len(linears) if prepack and _bf16_prepack() else 0)
    assert not any("forward" in vars(m) for m in linears)

    def broken(*a, **k):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gen_mod, "_forward", broken)
            generate(policy, prompt_ids, max_new_tokens=3, eos_token_id=5, greedy=True)
    assert not any("forward" in vars(m) for m in linears)

    calls = []
    head.forward = lambda x: calls.append(1) or torch.nn.functional.linear(x, head.weight, head.bias)
    try:
        generate(policy, prompt_ids, max_new_tokens=2, eos_token_id=_unused_id(torch.tensor([0])), greedy=True)
        assert len(calls) == 2 and "forward" in vars(head)
    finally:
        del head.forward


@pytest.mark.parametrize("shape", [(8, 1, 24), (40, 24), (3, 5, 24)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_prepacked_linear_equals_linear(shape, with_bias):
    """oneDNN's product on the weight blocked for 8-row inputs equals F.linear (float32, to rounding),
    for other row counts too (the prefill), 2-D and 3-D."""
    from alignkit.rollout.generate import _prepack, prepacked_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(50, 24, generator=g)
    b = torch.randn(50, generator=g) if with_bias else None
    packed = _prepack(w, 8)
    assert packed is not None  # this torch build (2.13 CPU) has the op; the decode relies on it
    out = prepacked_linear(x, packed, b)
    assert out.shape == (*shape[:-1], 50)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def _native_expected() -> bool:
    """Should skinny.c build here? On x86-64 Linux with AVX2 + FMA and a C compiler it must: a failed build
    there is a failure, not a skip."""
    import shutil

    from alignkit.rollout import native

    return native._cpu_ok() and shutil.which("cc") is not None


needs_native = pytest.mark.skipif(not _native_expected(), reason="skinny.c needs x86-64 Linux, AVX2 + FMA and cc")


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize("outputs", [8, 50, 1031])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_linear_equals_exact_product(rows, outputs, with_bias):
    """skinny.c's product, y = x W^T + b and in place h + (x W^T + b), for row counts that fill a block of
    8 or 4 or leave a tail, output counts that fill the last panel of 8 or not: within fp32 rounding of
    the float64 result (error below 1e-6 of sum |x||w| per output; a dropped or doubled term of the
    K = 37 sums is 1e-2 of it), and the padded panel columns never written past N."""
    from alignkit.rollout import native

    assert native.library() is not None
    g = torch.Generator().manual_seed(rows * 1000 + outputs)
    x, w = torch.randn(rows, 37, generator=g), torch.randn(outputs, 37, generator=g)
    b = torch.randn(outputs, generator=g) if with_bias else None
    exact = x.double() @ w.double().T + (b.double() if with_bias else 0)
    scale = x.abs().double() @ w.abs().double().T  # (rows, outputs): the size of each sum's rounding
    packed = native.pack(w)
    assert packed.shape == (-(-outputs // 8), 37, 8)
    y = native.linear(x, packed, outputs, b)
    assert y.shape == (rows, outputs)
    assert ((y.double() - exact).abs() / scale).max() < 1e-6
    h = torch.randn(rows, outputs + 3, generator=g)  # a wider buffer: the columns past N stay as they were
    view = h[:, :outputs].clone()
    before = h.clone()
    native.linear(x, packed, outputs, b, out=view)
    assert ((view.double() - before[:, :outputs].double() - exact).abs() / (scale + before[:, :outputs].abs())).max() < 1e-6
    if rows > 1:
        with pytest.raises(ValueError):
            native.linear(x, packed, outputs, b, out=h[:, :outputs])  # not contiguous
    with pytest.raises(ValueError):
        native.linear(x[:, :36], packed, outputs, b)  # the wrong input width


@needs_native
def test_native_kernel_follows_torch_threads():
    """The kernel's OpenMP threads are torch's own (one libgomp in the process), so torch.set_num_threads
    caps them: on one thread the product still equals the two-thread one bit for bit (each output is one
    thread's sum in order either way)."""
    from alignkit.rollout import native

    gomp = [line for line in open("/proc/self/maps") if "libgomp" in line]
    native.library()
    assert {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line} == {line.split()[-1] for line in gomp}
    x, w = torch.randn(8, 64), torch.randn(300, 64)
    packed = native.pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.linear(x, packed, 300)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, native.linear(x, packed, 300))


@needs_native
def test_native_rmsnorm_equals_the_models_rmsnorm():
    """skinny.c's RMSNorm equals transformers' LlamaRMSNorm to fp32 rounding (rtol 2e-6), with an eps large
    enough (1e-2) that dropping it, or normalising by the sum instead of the mean, would be 100x over."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from alignkit.rollout import native

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(37, eps=1e-2)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5, generator=g)
    x = torch.randn(5, 37, generator=g) * 3
    with torch.no_grad():
        torch.testing.assert_close(native.rmsnorm(x, norm.weight, norm.variance_epsilon), norm(x), rtol=2e-6, atol=1e-7)


@needs_native
@pytest.mark.parametrize("dim", [16, 12])
def test_native_attention_equals_sdpa(dim):
    """skinny.c's one-query attention equals SDPA the way the decoder calls it (grouped heads as query
    positions, a bool mask over the first ``upto`` columns), for 4 query heads on 2 key/value heads,
    left-padded rows, a head size with and without a tail past 8; queries read out of a fused
    q/k/v-like buffer; a row with no allowed column gets zeros."""
    from alignkit.rollout import native

    g = torch.Generator().manual_seed(dim)
    rows, heads, kv, length, upto = 4, 4, 2, 20, 13
    fused = torch.randn(rows, heads + 2 * kv, dim, generator=g)  # q, k, v of one token, as the decoder has them
    q = fused[:, :heads]
    keys, values = torch.randn(rows, kv, length, dim, generator=g), torch.randn(rows, kv, length, dim, generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, 3:7] = 0
    mask[3] = 0  # nothing to attend to
    out = native.attention(q, keys, values, mask, upto, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(rows, kv, heads // kv, dim), keys[:, :, :upto], values[:, :, :upto],
        attn_mask=mask[:, :upto].bool()[:, None, None, :], scale=0.3).reshape(rows, heads * dim)
    torch.testing.assert_close(out[:3], ref[:3], rtol=0, atol=2e-6)
    assert torch.equal(out[3], torch.zeros(heads * dim))
    with pytest.raises(ValueError):
        native.attention(q, keys, values, mask.int(), upto, 0.3)  # an int32 mask would be misread


def _bf16_prepack() -> bool:
    """Can oneDNN block bf16 weights on this CPU? It refuses without AVX512-BW/VL/DQ or AVX-NE-CONVERT
    (an AVX2-only CPU), and then the decode keeps F.linear under bf16 autocast."""
    from alignkit.rollout.generate import _prepack

    return _prepack(torch.zeros(4, 4, dtype=torch.bfloat16), 8) is not None


def test_prepacked_bf16_linear_matches_autocast():
    """Under bf16 autocast the decode casts input and weight to bf16, as autocast's F.linear does: the
    same bf16 output to bf16 rounding of a 24-term sum. On a CPU where oneDNN cannot block bf16
    weights, _prepack says so (None) instead of raising, which is what the callers' fallback needs."""
    from alignkit.rollout.generate import _prepack, prepacked_linear

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(8, 1, 24, generator=g), torch.randn(50, 24, generator=g), torch.randn(50, generator=g)
    if not _bf16_prepack():
        assert _prepack(w.to(torch.bfloat16), 8) is None
        return
    out = prepacked_linear(x, _prepack(w.to(torch.bfloat16), 8), b.to(torch.bfloat16), dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x, w, b)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert (out.double() - exact).abs().max() < 0.1 < (torch.nn.functional.linear(x, w).double() - exact).abs().max()


def _llama_variant(vocab: int, variant: str):
    """Tiny models that exercise the decoder's layout: Llamas with grouped-query attention (4 query heads
    on 2 key/value heads), biases on every projection, or linear RoPE scaling; and the other members of
    the family (Mistral; Qwen2 with q/k/v biases and a sliding window on its second layer, wider than the
    generations here; Qwen3 with its per-head q/k norms, their weights made to matter). Logits sharpened
    as in ``policy``."""
    import transformers

    torch.manual_seed(1)
    cls, extra = {"gqa": ("Llama", dict(num_key_value_heads=2)),
                  "bias": ("Llama", dict(attention_bias=True, mlp_bias=True)),
                  "rope": ("Llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
                  "mistral": ("Mistral", dict(num_key_value_heads=2, sliding_window=None)),
                  "mistral-window": ("Mistral", dict(num_key_value_heads=2, sliding_window=64)),
                  "qwen2": ("Qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=64,
                                          max_window_layers=1)),
                  "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=16))}[variant]
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False, **{"num_key_value_heads": 4, **extra})
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.02)  # biases that change the tokens (larger ones collapse the output)
            if name.endswith(("q_norm", "k_norm")):
                m.weight.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("products", ["native", "onednn"])
@pytest.mark.parametrize("variant", ["policy", "gqa", "bias", "rope", "mistral", "mistral-window", "qwen2", "qwen3"])
def test_llama_decoder_decodes_as_transformers(policy, prompt_ids, monkeypatch, variant, products):
    """The flat Llama step (fused, prepacked products; one key/value buffer per layer) gives the tokens
    and log-probs of transformers' own decoding, for left-padded prompts of different lengths, with
    grouped-query heads, projection biases and scaled RoPE, and for Mistral, Qwen2 (q/k/v biases, a
    sliding window wider than the generation) and Qwen3 (per-head q/k norms); and it is the path
    generate takes. Both product kernels: skinny.c's (residuals added in place) and oneDNN's."""
    if products == "native" and not _native_expected():
        pytest.skip("skinny.c needs x86-64 Linux, AVX2 + FMA and cc")
    monkeypatch.setattr(llama_decode, "NATIVE", products == "native")
    built = llama_decode.LlamaDecoder.__init__
    kinds = []
    monkeypatch.setattr(llama_decode.LlamaDecoder, "__init__",
                        lambda self, *a, **k: built(self, *a, **k) or kinds.append(self.native))
    model = policy if variant == "policy" else _llama_variant(policy.config.vocab_size, variant)
    eos = _unused_id(torch.tensor([0]))
    steps = []
    step = llama_decode.LlamaDecoder.step
    monkeypatch.setattr(llama_decode.LlamaDecoder, "step", lambda self, *a: steps.append(1) or step(self, *a))
    fast = generate(model, prompt_ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, greedy=True)
    assert len(steps) == 9  # every token after the prefill's
    g = torch.Generator().manual_seed(0)
    fast_sampled = generate(model, prompt_ids, max_new_tokens=10, temperature=0.7, eos_token_id=eos, pad_token_id=0,
                            generator=g)
    monkeypatch.setattr(llama_decode, "ENABLED", False)
    slow = generate(model, prompt_ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, greedy=True)
    g = torch.Generator().manual_seed(0)
    slow_sampled = generate(model, prompt_ids, max_new_tokens=10, temperature=0.7, eos_token_id=eos, pad_token_id=0,
                            generator=g)
    assert len(steps) == 18  # the sampled run used it too; the generic path did not
    assert kinds == [products == "native"] * 2
    assert torch.equal(fast.response_ids, slow.response_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=2e-5, rtol=0)
    assert torch.equal(fast_sampled.response_ids, slow_sampled.response_ids)
    torch.testing.assert_close(fast_sampled.logprobs, slow_sampled.logprobs, atol=2e-5, rtol=0)
    # not a degenerate repeat of one token, which would hide a wrong position, key or value
    assert len(set(fast.response_ids.reshape(-1).tolist())) >= 4
    assert len(set(fast_sampled.response_ids.reshape(-1).tolist())) > 10


def test_llama_decoder_only_for_plain_fp32_llamas(policy, prompt_ids):
    """Anything the flat step does not reproduce keeps transformers' forward: another architecture,
    fp16 autocast, float64 weights, a module with a hook or a replaced forward, a torch without the
    blocking op, the switch off; bf16 autocast runs it on bf16 copies of the weights."""
    from alignkit.rollout.generate import _prepack

    assert llama_decode.llama_decoder(policy, 3, 20, _prepack) is not None
    assert llama_decode.llama_decoder(_tiny_gpt2(policy.config.vocab_size), 3, 20, _prepack) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # without bf16 blocking on this CPU: the generic path
        decoder = llama_decode.llama_decoder(policy, 3, 20, _prepack)
        assert (decoder.dtype == torch.bfloat16) if _bf16_prepack() else (decoder is None)
    with torch.autocast("cpu", dtype=torch.float16):
        assert llama_decode.llama_decoder(policy, 3, 20, _prepack) is None
    assert llama_decode.llama_decoder(copy.deepcopy(policy).double(), 3, 20, _prepack) is None
    hooked = copy.deepcopy(policy)
    hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert llama_decode.llama_decoder(hooked, 3, 20, _prepack) is None
    replaced = copy.deepcopy(policy)
    replaced.model.norm.forward = lambda x: x
    assert llama_decode.llama_decoder(replaced, 3, 20, _prepack) is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_decode, "NATIVE", False)  # oneDNN's products: without its blocking op, no decoder
        assert llama_decode.llama_decoder(policy, 3, 20, lambda w, rows: None) is None
        assert not llama_decode.llama_decoder(policy, 3, 20, _prepack).native
    if _native_expected():  # skinny.c needs no oneDNN op, up to native.MAX_ROWS rows
        assert llama_decode.llama_decoder(policy, 3, 20, lambda w, rows: None).native
        assert not llama_decode.llama_decoder(policy, 33, 20, _prepack).native
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_decode, "ENABLED", False)
        assert llama_decode.llama_decoder(policy, 3, 20, _prepack) is None


def test_llama_decoder_takes_the_llama_family_and_only_where_a_sliding_window_cannot_bite(policy):
    """Mistral, Qwen2 and Qwen3 decode through the flat step; a subclass of a family class (which may
    change the layer) does not; a sliding window narrower than prompt + new tokens keeps transformers'
    masks, which drop the early keys, while a window as wide as the generation takes the step."""
    from alignkit.rollout.generate import _prepack

    vocab = policy.config.vocab_size
    for variant in ("mistral", "qwen2", "qwen3"):
        assert llama_decode.llama_decoder(_llama_variant(vocab, variant), 3, 20, _prepack) is not None, variant
    windowed = _llama_variant(vocab, "mistral-window")  # sliding_window 64
    assert llama_decode.llama_decoder(windowed, 3, 64, _prepack) is not None
    assert llama_decode.llama_decoder(windowed, 3, 65, _prepack) is None
    qwen2 = _llama_variant(vocab, "qwen2")  # its second layer slides over 64 positions
    assert llama_decode.llama_decoder(qwen2, 3, 65, _prepack) is None
    subclass = type("MyLlama", (type(policy),), {})
    mine = copy.deepcopy(policy)
    mine.__class__ = subclass
    assert llama_decode.llama_decoder(mine, 3, 20, _prepack) is None


def _generate_both(model, prompt_ids, monkeypatch, **kwargs):
    """generate() through the flat step and through transformers' forward (greedy), with the step's calls counted."""
    eos = _unused_id(torch.tensor([0]))
    steps, runs = [], {}
    step = llama_decode.LlamaDecoder.step
    monkeypatch.setattr(llama_decode.LlamaDecoder, "step", lambda self, *a: steps.append(1) or step(self, *a))
    for fast in (True, False):
        monkeypatch.setattr(llama_decode, "ENABLED", fast)
        runs[fast] = generate(model, prompt_ids, eos_token_id=eos, pad_token_id=0, greedy=True, **kwargs)
    return runs[True], runs[False], len(steps)


def test_a_sliding_window_that_bites_is_left_to_transformers(prompt_ids, policy, monkeypatch):
    """With a window narrower than the generation, transformers' masks change the tokens (the early keys
    drop out), so generate must decode through them: the step is never called. That the window bites
    here is checked too: the same weights without a window give other tokens (which the step, blind to
    the window, would have produced)."""
    windowed = _llama_variant(policy.config.vocab_size, "mistral-window")
    windowed.config.sliding_window = 6
    open_ = copy.deepcopy(windowed)
    open_.config.sliding_window = None
    fast, _, steps = _generate_both(windowed, prompt_ids, monkeypatch, max_new_tokens=12)
    assert steps == 0
    unwindowed, generic, steps = _generate_both(open_, prompt_ids, monkeypatch, max_new_tokens=12)
    assert steps > 0 and torch.equal(unwindowed.response_ids, generic.response_ids)
    assert not torch.equal(unwindowed.response_ids, fast.response_ids)  # the window did bite


_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model, **kwargs):
    """peft LoRA (r 4, dropout 0.1) on every projection of a copy of ``model``; B drawn at random, so
    (unlike peft's zero start) the adapters change the tokens."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                 target_modules=_LORA_TARGETS, **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


@pytest.mark.parametrize("variant", ["policy", "qwen2"])
def test_llama_decoder_decodes_lora_models_on_merged_weights(policy, prompt_ids, monkeypatch, variant):
    """A LoRA policy (PPO's and GRPO's rollouts with --lora-r) decodes through the flat step on base +
    scaling * B A: the tokens and log-probs of peft's own forward (greedy and sampled, dropout off in eval);
    with the adapters disabled (the reference of a LoRA run), the base model's tokens. The adapters do
    change the tokens here, so a step that ignored them would fail."""
    base = policy if variant == "policy" else _llama_variant(policy.config.vocab_size, variant)
    model = _lora(base)
    fast, slow, steps = _generate_both(model, prompt_ids, monkeypatch, max_new_tokens=10)
    assert steps == 9
    assert torch.equal(fast.response_ids, slow.response_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=2e-5, rtol=0)
    eos = _unused_id(torch.tensor([0]))
    sampled = {}
    for on in (True, False):
        monkeypatch.setattr(llama_decode, "ENABLED", on)
        sampled[on] = generate(model, prompt_ids, max_new_tokens=10, temperature=0.7, eos_token_id=eos, pad_token_id=0,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled[True].response_ids, sampled[False].response_ids)
    torch.testing.assert_close(sampled[True].logprobs, sampled[False].logprobs, atol=2e-5, rtol=0)
    plain, _, _ = _generate_both(base, prompt_ids, monkeypatch, max_new_tokens=10)
    assert not torch.equal(plain.response_ids, fast.response_ids)  # the adapters matter
    with model.disable_adapter():
        off, _, steps = _generate_both(model, prompt_ids, monkeypatch, max_new_tokens=10)
    assert steps == 9 and torch.equal(off.response_ids, plain.response_ids)
    torch.testing.assert_close(off.logprobs, plain.logprobs, atol=2e-5, rtol=0)
    assert all(not m.merged for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))


def test_llama_decoder_leaves_other_peft_setups_to_peft(policy):
    """What the merged weight does not reproduce keeps the generic path: DoRA, a bias on B, a module peft
    trains in full (modules_to_save wraps the LM head), and LoRA under bf16 autocast."""
    from alignkit.rollout.generate import _prepack

    assert llama_decode.llama_decoder(_lora(policy), 3, 20, _prepack) is not None
    assert llama_decode.llama_decoder(_lora(policy, use_dora=True), 3, 20, _prepack) is None
    assert llama_decode.llama_decoder(_lora(policy, lora_bias=True), 3, 20, _prepack) is None
    assert llama_decode.llama_decoder(_lora(policy, modules_to_save=["lm_head"]), 3, 20, _prepack) is None
    any_cpu = lambda w, rows: w  # noqa: E731  a blocking that always succeeds: the refusal is then the LoRA check's
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 LoRA decoding is not checked against peft's: refused
        assert llama_decode.llama_decoder(policy, 3, 20, any_cpu) is not None
        assert llama_decode.llama_decoder(_lora(policy), 3, 20, any_cpu) is None


def test_sample_k_runs_each_prompt_once_and_matches_the_padded_batch(policy, prompt_ids, monkeypatch):
    """k samples per prompt through the Llama decoder: the prefill sees each distinct prompt once
    (3 rows, not 3k), and the k rows continue from copies of its keys and values: the same tokens and
    log-probs as decoding all 3k rows through transformers, greedy and sampled."""
    import importlib

    gen_mod = importlib.import_module("alignkit.rollout.generate")
    prefill_rows = []
    forward = gen_mod._forward
    monkeypatch.setattr(gen_mod, "_forward", lambda model, ids, *a: prefill_rows.append(ids.shape) or forward(model, ids, *a))
    eos = _unused_id(torch.tensor([0]))
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(llama_decode, "ENABLED", fast)
        g = torch.Generator().manual_seed(0)
        runs[fast] = (sample_k(policy, prompt_ids, 3, max_new_tokens=6, eos_token_id=eos, pad_token_id=0, greedy=True),
                      sample_k(policy, prompt_ids, 3, max_new_tokens=6, temperature=0.8, eos_token_id=eos,
                               pad_token_id=0, generator=g))
    width = max(map(len, prompt_ids))
    # the decoder's two runs call the model only for their prefills, one row per prompt; transformers'
    # path prefills every row, then feeds the 5 later tokens
    assert prefill_rows == [(3, width)] * 2 + ([(9, width)] + [(9, 1)] * 5) * 2
    for fast, slow in zip(runs[True], runs[False]):
        assert torch.equal(fast.response_ids, slow.response_ids)
        torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=2e-5, rtol=0)
        assert fast.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    sampled = runs[True][1].response_ids
    assert not torch.equal(sampled[0], sampled[1])  # the copies of one prompt still sample apart


@pytest.mark.parametrize("variant", ["policy", "gqa"])
def test_llama_decoder_under_bf16_autocast_decodes_as_transformers(policy, prompt_ids, monkeypatch, variant):
    """--precision bf16: the decoder's products on bf16 weight copies (inputs cast as autocast casts
    them), its attention under the caller's autocast: the greedy tokens of transformers' decoding under
    the same autocast, and log-probs as close to the fp32 model's as transformers' bf16 ones are (the
    two bf16 paths round differently: fused products, another order of additions)."""
    if not _bf16_prepack():
        pytest.skip("oneDNN cannot block bf16 weights on this CPU (AVX2 only), so bf16 decoding never takes "
                    "the decoder here; test_llama_decoder_only_for_plain_fp32_llamas checks that fallback")
    model = policy if variant == "policy" else _llama_variant(policy.config.vocab_size, variant)
    eos = _unused_id(torch.tensor([0]))
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(llama_decode, "ENABLED", fast)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[fast] = generate(model, prompt_ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, greedy=True)
    assert torch.equal(runs[True].response_ids, runs[False].response_ids)
    monkeypatch.setattr(llama_decode, "ENABLED", True)
    fp32 = generate(model, prompt_ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, greedy=True)
    assert torch.equal(fp32.response_ids, runs[True].response_ids)
    ours, theirs = ((r.logprobs - fp32.logprobs).abs().max() for r in (runs[True], runs[False]))
    assert 1e-4 < theirs  # bf16 did round (logits here reach ~+-17: bf16 steps of 0.06-0.125)
    assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)
