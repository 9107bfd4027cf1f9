"""One decoding step of a Llama-family model (Llama, Mistral, Qwen2, Qwen3), written out over
prepacked, fused weights.

:func:`alignkit.rollout.generate` feeds one token per row per step. On a small model on the CPU,
transformers' forward spent ~20 of such a step's ~50 ms (SmolLM2-135M, 8 rows) outside the matrix
products: ~25 module calls per layer, a new attention mask, a cache object. This module runs the same step as a flat loop:

- per layer four products instead of seven: q, k, v as one (q+k+v rows) weight, gate and up as one,
  then o and down; each weight, and the head, blocked once per generation for B-row inputs. In fp32
  with up to ``native.MAX_ROWS`` rows the products are alignkit's own ``skinny.c`` (:mod:`.native`,
  built once per machine with its C compiler), which also adds o's and down's outputs into the
  residual stream in place; elsewhere, or where it does not build, oneDNN's on its own blocked
  copies (:mod:`.onednn`, the ops inductor's CPU backend uses for frozen linears). On the 2-core
  AVX2 EPYC, 8 rows of SmolLM2-135M, a step took 50 ms with skinny.c's products against 78 ms with
  oneDNN's, and 34 ms once skinny.c also ran the RMSNorms and the attention (``ak_rmsnorm``,
  ``ak_attention``: one call each where torch took ~7 and SDPA) against 67 ms in that run
  (``benchmarks/probe_decode.py``);
- the model's own RMSNorm forwards, rotary embedding and ``rotate_half``, so their numerics (and rope
  scaling) are transformers' own; RoPE runs once over the queries and keys together (the formula of
  ``apply_rotary_pos_emb``, which would run it on each);
- keys and values in one preallocated (B, kv heads, P + max_new_tokens, head dim) buffer per layer,
  attention over the columns written so far with a (B, 1, 1, columns) bool mask, the query heads of a key/value
  head grouped as transformers' SDPA path groups them for one query position.

Mistral, Qwen2 and Qwen3 are Llama's layer with small changes, which the step covers: biases on
q, k and v (Qwen2; fused with the weights), RMSNorm over each head's queries and keys before RoPE
(Qwen3's ``q_norm`` / ``k_norm``), and sliding-window attention, which the decoder takes only where
the window cannot bite (prompt + new tokens <= ``sliding_window``; longer generations keep
transformers' masks).

The prompt itself (prefill) still runs through the model with a ``DynamicCache``; :meth:`load`
copies its keys and values in. For :func:`~alignkit.rollout.generate.sample_k` (k responses per
prompt, GRPO's groups) the prefill runs each distinct prompt once and its keys and values are copied
to its k rows. :func:`llama_decoder` builds the decoder only for a plain ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` with fp32 weights on the CPU,
without hooks or replaced forwards; under bf16 autocast its products run on bf16 copies of the
weights, as autocast's would. Under peft LoRA (a LoRA policy's rollouts in PPO and GRPO), in fp32,
each weight is blocked as base + scaling · B A, what peft's merge computes, so the adapters cost
nothing while decoding; LoRA under bf16 autocast, DoRA and other variants, other peft methods and
wrappers keep the generic path, as do other architectures and fp16. The tests check it against
transformers' (and peft's) decoding, for each of the four architectures: in fp32 the same greedy
and sampled tokens (test-sized runs) and log-probs to 2e-5; under bf16 the same greedy tokens, and
log-probs as close to the fp32 model's as transformers' bf16 ones.

SmolLM2-135M, ``sample_k`` of 2 prompts x 4, 64 new tokens, 2 cores, alternating runs: fp32
2.94-3.42 s per generation against 3.55-4.11 s for transformers' forward over prepacked weights;
bf16 autocast 2.31-2.35 s against 2.82-3.02 s (benchmarks/README.md, bench_rl section, item 4).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import native, onednn

# False: every model decodes through transformers' forward (generate's generic path)
ENABLED = True
# False: fp32 products through oneDNN even where skinny.c's kernel (:mod:`.native`) builds and runs
NATIVE = True


class LlamaDecoder:
    """Decoding steps for ``rows`` sequences of at most ``length`` positions (prompt + new tokens)."""

    def __init__(self, model, rows: int, length: int, prepack, dtype: torch.dtype = torch.float32,
                 use_native: bool = False):
        def packed(layers) -> tuple[torch.Tensor, torch.Tensor | None, int]:
            """The layers' weights stacked along the outputs, in ``dtype``, blocked for B rows (``native.pack``'s
            panels, or oneDNN's layout); their biases; the number of outputs."""
            weights = [_weight(layer).to(dtype) for layer in layers]  # (outputs, inputs) each
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # (sum of outputs, inputs)
            blocked = native.pack(weight) if use_native else prepack(weight, rows)
            return blocked, _cat_bias([_base(layer) for layer in layers], dtype), weight.shape[0]

        self.native = use_native  # fp32 products through skinny.c, residual additions in place

        inner, cfg = model.model, model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self.rotate_half = sys.modules[type(model).__module__].rotate_half  # the model's own module's
        self.dtype = dtype
        self.head = packed([model.lm_head])
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "qkv": packed([attn.q_proj, attn.k_proj, attn.v_proj]), "o": packed([attn.o_proj]),
                "gate_up": packed([mlp.gate_proj, mlp.up_proj]), "down": packed([mlp.down_proj]),
                "norm_in": layer.input_layernorm, "norm_post": layer.post_attention_layernorm,
                "act": mlp.act_fn, "inter": _base(mlp.gate_proj).out_features, "scale": attn.scaling,
                # Qwen3: RMSNorm over each head's queries and keys, before RoPE (None elsewhere)
                "q_norm": getattr(attn, "q_norm", None), "k_norm": getattr(attn, "k_norm", None),
                # (B, kv heads, length, head dim), written at each row's column as tokens are fed
                "keys": torch.zeros(rows, self.kv_heads, length, self.head_dim),
                "values": torch.zeros(rows, self.kv_heads, length, self.head_dim),
            })
        # skinny.c's RMSNorm and attention too, where every norm is one of the family's RMSNorm classes (the
        # formula ak_rmsnorm reproduces) on fp32 weights
        norms = [self.norm] + [layer[key] for layer in self.layers for key in ("norm_in", "norm_post")]
        self.native_rest = use_native and all(_family_rmsnorm(norm) for norm in norms)

    def load(self, cache, width: int, repeats: int = 1) -> None:
        """Copy the prefill's keys and values (a ``DynamicCache`` over (B / repeats, P) prompts) into
        columns 0..P-1, each prompt's into ``repeats`` consecutive rows."""
        for buffers, layer in zip(self.layers, cache.layers):
            buffers["keys"][:, :, :width] = layer.keys.repeat_interleave(repeats, 0)
            buffers["values"][:, :, :width] = layer.values.repeat_interleave(repeats, 0)

    def step(self, token: torch.Tensor, position: torch.Tensor, column: int, mask: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (B,) at RoPE position ``position`` (B,) into buffer column ``column``; ``mask``
        (B, length) is nonzero on the columns each row attends to (this one included). Returns the
        next-token logits (B, V) float32."""
        rows, heads, kv, dim = token.shape[0], self.heads, self.kv_heads, self.head_dim
        upto = column + 1  # buffer columns written so far (every row writes this step's at ``column``)
        # skinny.c's attention reads the int64 mask itself; SDPA takes a (B, 1, 1, upto) bool one
        native_attention = self.native_rest and mask.dtype == torch.long and mask.stride(1) == 1
        allowed = None if native_attention else mask[:, :upto].bool()[:, None, None, :]
        h = self.embed(token)  # (B, H)
        cos, sin = self.rotary(h, position[:, None])  # (B, 1, head dim) each: broadcast over the heads
        for layer in self.layers:
            qkv = self._linear(self._norm(layer["norm_in"], h), layer["qkv"])  # (B, (heads + 2 kv) * dim)
            # RoPE on the queries and keys in one pass, as apply_rotary_pos_emb does to each
            qk = qkv[:, :(heads + kv) * dim].view(rows, heads + kv, dim)
            if layer["q_norm"] is not None:  # Qwen3
                qk = torch.cat([layer["q_norm"].forward(qk[:, :heads]), layer["k_norm"].forward(qk[:, heads:])], 1)
            qk = qk * cos + self.rotate_half(qk) * sin  # (B, heads + kv, dim)
            q = qk[:, :heads]  # (B, heads, dim)
            layer["keys"][:, :, column] = qk[:, heads:]
            layer["values"][:, :, column] = qkv[:, (heads + kv) * dim:].view(rows, kv, dim)
            if native_attention:  # over the columns written so far: (B, heads * dim)
                out = native.attention(q, layer["keys"], layer["values"], mask, upto, layer["scale"])
            else:
                # the heads sharing a key/value head as that head's queries: (B, kv, heads / kv, dim)
                # over the columns written so far only: the later ones are masked for every row
                out = F.scaled_dot_product_attention(
                    q.view(rows, kv, heads // kv, dim), layer["keys"][:, :, :upto], layer["values"][:, :, :upto],
                    attn_mask=allowed, scale=layer["scale"]).reshape(rows, heads * dim)
            h = self._linear(out, layer["o"], residual=h)
            gate_up = self._linear(self._norm(layer["norm_post"], h), layer["gate_up"])  # (B, 2 * intermediate)
            inter = layer["inter"]
            h = self._linear(layer["act"](gate_up[:, :inter]) * gate_up[:, inter:], layer["down"], residual=h)
        return self._linear(self._norm(self.norm, h), self.head).float()  # (B, V)

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm of x (B, H): skinny.c's with the native products, else the module's forward."""
        if self.native_rest:
            return native.rmsnorm(x, norm.weight, norm.variance_epsilon)
        return norm.forward(x)

    def _linear(self, x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor | None, int],
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in) -> x W^T + b (B, out) in the decoder's dtype (x cast first, as autocast casts a linear's
        input); with ``residual`` (B, out) fp32, residual + (x W^T + b), written into ``residual`` itself
        on the native path (the decoder's own hidden state, read by nothing else)."""
        weight, bias, outputs = packed
        if self.native:
            return native.linear(x, weight, outputs, bias, out=residual)
        y = onednn.linear(x, weight, bias, self.dtype)
        return y if residual is None else residual + y


def _family_rmsnorm(norm: torch.nn.Module) -> bool:
    """Is ``norm`` transformers' RMSNorm of a :data:`FAMILY` model (weight * x / sqrt(mean(x^2) + eps), the
    same forward in all four) with a contiguous fp32 weight?"""
    folder = type(norm).__name__.removesuffix("RMSNorm").lower()
    return (folder in FAMILY.values() and type(norm).__module__ == f"transformers.models.{folder}.modeling_{folder}"
            and norm.weight.dtype == torch.float32 and norm.weight.is_contiguous())


def _base(layer: torch.nn.Module) -> torch.nn.Linear:
    """The ``nn.Linear`` itself, or the one a peft LoRA layer wraps."""
    return getattr(layer, "base_layer", layer)


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    """The (outputs, inputs) weight the layer's eval-mode forward computes with: a plain linear's own; for a
    peft LoRA layer (checked by :func:`_lora_ok`) its base weight plus scaling · B A of each active adapter
    (peft's ``get_delta_weight``, what ``merge`` adds), unless the adapters are disabled or already merged.
    x (W + s B A)^T equals peft's x W^T + s (x A^T) B^T to rounding."""
    base = _base(layer).weight.detach()
    if layer is _base(layer) or layer.disable_adapters or layer.merged:
        return base
    deltas = [layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A]
    return base + sum(deltas) if deltas else base


def _lora_ok(layer: torch.nn.Module) -> bool:
    """Is ``layer`` a peft LoRA linear whose eval forward :func:`_weight` reproduces: plain LoRA (no DoRA or
    other variant, no bias on B) around a plain ``nn.Linear``, not merged-then-disabled (peft would unmerge)?"""
    from peft.tuners.lora import Linear as LoraLinear  # only called once a peft module was found

    if type(layer) is not LoraLinear or type(layer.base_layer) is not torch.nn.Linear:
        return False
    if layer.merged and layer.disable_adapters:
        return False
    return not any(name in layer.lora_variant or layer.lora_bias.get(name) for name in layer.active_adapters)


def _peft_wrappers(model) -> tuple[torch.nn.Module, set[int]]:
    """(the transformers model, ids of the peft wrapper modules around it: the PeftModel and its LoraModel)
    for a peft model; (model, {}) for any other."""
    from ..models import _is_peft

    if not _is_peft(model):
        return model, set()
    return model.get_base_model(), {id(model), id(model.base_model)}


def _cat_bias(layers, dtype: torch.dtype) -> torch.Tensor | None:
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat([(layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(layer.out_features))
                      .to(dtype) for layer in layers])


# The causal LMs whose decoder layer the step reproduces: transformers' class name -> model folder
FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
          "Qwen3ForCausalLM": "qwen3"}


def _family_class(model) -> bool:
    """Is ``model`` exactly one of transformers' :data:`FAMILY` classes? A subclass may change the layer.
    Compared by name and module, so checking a Llama imports no other model's code."""
    folder = FAMILY.get(type(model).__name__)
    return folder is not None and type(model).__module__ == f"transformers.models.{folder}.modeling_{folder}"


def llama_decoder(model, rows: int, length: int, prepack=onednn.prepack) -> LlamaDecoder | None:
    """A :class:`LlamaDecoder` where the model is a plain :data:`FAMILY` model (or, in fp32, one under peft
    LoRA adapters, decoded on its merged weights) with fp32 weights on the CPU, outside autocast or
    under bf16 autocast (then its products run on bf16 copies, as autocast's), with no module hooks or
    per-instance forwards, no sliding window shorter than ``length``, and a product to run: skinny.c's
    (fp32, at most ``native.MAX_ROWS`` rows, :data:`NATIVE` on, built here) or ``prepack``'s
    (:func:`.onednn.prepack`); else None (the caller keeps transformers' forward)."""
    from ..models import window_cuts

    dtype = onednn.decode_dtype()
    inner, wrappers = _peft_wrappers(model)
    if not ENABLED or not _family_class(inner) or dtype not in (torch.float32, torch.bfloat16):
        return None
    if window_cuts(inner, length):  # the window would drop early keys: transformers' masks do that
        return None
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        return None
    for module in model.modules():
        if "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks:
            return None
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear:
            return None
        # peft: only its wrappers and plain LoRA linears (prompt tuning, DoRA, modules_to_save... are not reproduced),
        # in fp32 (under bf16 peft rounds the adapters' product apart from the base's: not checked against it)
        if type(module).__module__.startswith("peft.") and id(module) not in wrappers \
                and (dtype != torch.float32 or not _lora_ok(module)):
            return None
    use_native = NATIVE and dtype == torch.float32 and native.available(rows)
    if not use_native and prepack(_base(inner.lm_head).weight.detach()[:1].to(dtype), rows) is None:  # op missing
        return None
    return LlamaDecoder(inner, rows, length, prepack, dtype, use_native)
