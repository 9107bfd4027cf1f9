"""Model loading, LoRA, reference models and atomic saving (tiny random models; one slow real-model test)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit import embedded
from alignkit.errors import InputError
from alignkit.models import (add_lora, cached_model_dir, count_parameters, frozen_copy, load_causal_lm,
                             load_tokenizer, plain_state_model, reference_context, resolve_model_source,
                             save_model)

from conftest import make_tiny_llama


def _logits(model, ids=None):
    ids = torch.tensor([[1, 5, 9, 42, 7, 300]]) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- resolve_model_source

def test_resolve_embedded():
    src = resolve_model_source("smollm2-135m-instruct")
    assert src.kind == "embedded" and src.gguf_file.endswith(".gguf")


def test_resolve_gguf_and_folder_and_hub(tmp_path, tiny_model_dir):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    src = resolve_model_source(str(g))
    assert (src.kind, src.gguf_file) == ("gguf", "m.gguf")
    assert resolve_model_source(str(tiny_model_dir)).kind == "folder"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert resolve_model_source(str(adapter)).kind == "folder"
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == resolve_model_source("HuggingFaceTB/SmolLM2-135M")
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"


@pytest.mark.parametrize("name", ["missing.gguf", "/no/such/folder", "nonsense-name", "./rel/missing"])
def test_resolve_errors(tmp_path, name):
    with pytest.raises(InputError) as e:
        resolve_model_source(str(tmp_path / name) if name == "missing.gguf" else name)
    assert e.value.field == "model"


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(InputError) as e:
        resolve_model_source(str(tmp_path))
    assert e.value.field == "model" and str(tmp_path) in str(e.value)


def test_corrupt_config_is_input_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        load_causal_lm(str(tmp_path))
    assert e.value.field == "model"


# ---------------------------------------------------------------- loading / saving full models

def test_load_folder_same_logits(tiny_model_dir, tokenizer):
    original = make_tiny_llama(len(tokenizer))  # same seed: the weights saved in tiny_model_dir
    loaded = load_causal_lm(str(tiny_model_dir))
    torch.testing.assert_close(_logits(loaded), _logits(original), rtol=0, atol=0)
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.pad_token is not None


def test_save_model_roundtrip(tmp_path, tiny_model, tokenizer):
    out = tmp_path / "out"
    save_model(tiny_model, tokenizer, out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not any(p.name.startswith(".tmp-model") for p in out.iterdir())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(loaded), _logits(tiny_model), rtol=0, atol=0)


def test_plain_state_model_drops_quantization_config(tmp_path, tiny_model, tokenizer):
    tiny_model.config.quantization_config = {"quant_method": "gguf"}
    plain = plain_state_model(tiny_model)
    assert plain is not tiny_model and getattr(plain.config, "quantization_config", None) is None
    out = tmp_path / "out"
    save_model(tiny_model, tokenizer, out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(tiny_model))


def test_plain_state_model_identity_for_plain(tiny_model):
    assert plain_state_model(tiny_model) is tiny_model


@pytest.mark.parametrize("values", [[float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]])
def test_non_finite_weights_refused(tmp_path, tiny_model, tokenizer, values):
    with torch.no_grad():
        for i, v in enumerate(values):
            tiny_model.model.layers[0].mlp.up_proj.weight[0, i] = v
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="up_proj"):
        save_model(tiny_model, tokenizer, out)
    assert not out.exists() or not any(out.glob("*.safetensors"))


def test_finite_weights_whose_sum_overflows_are_saved(tmp_path, tiny_model, tokenizer):
    """The finiteness check sums each tensor first; a sum that overflows (every value finite) must
    fall through to the exact check, not refuse the save."""
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight[0, :4] = 3e38
    assert not torch.isfinite(tiny_model.model.layers[0].mlp.up_proj.weight.sum())
    save_model(tiny_model, tokenizer, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_frozen_copy_and_count(tiny_model):
    ref = frozen_copy(tiny_model)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    trainable, total = count_parameters(tiny_model)
    assert trainable == total > 0 and count_parameters(ref) == (0, total)
    with torch.no_grad():
        tiny_model.lm_head.weight.add_(1.0)
    assert not torch.equal(_logits(ref), _logits(tiny_model))  # independent weights


# ---------------------------------------------------------------- LoRA

def _perturbed_lora(model, r=4):
    peft_model = add_lora(model, r=r)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


def test_add_lora_trainable_and_reference(tiny_model):
    base_logits = _logits(tiny_model)
    peft_model = _perturbed_lora(tiny_model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("lm_head" in n for n, _ in peft_model.named_parameters() if "lora_" in n)
    trainable, total = count_parameters(peft_model)
    assert 0 < trainable < total
    assert peft_model.peft_config["default"].lora_alpha == 8
    assert not torch.allclose(_logits(peft_model), base_logits)
    with reference_context(peft_model):
        torch.testing.assert_close(_logits(peft_model), base_logits, rtol=0, atol=0)
    with reference_context(frozen_copy(tiny_model)):  # no-op for plain models
        pass


def test_save_lora_adapter(tmp_path, tokenizer):
    vocab = len(tokenizer)
    peft_model = _perturbed_lora(make_tiny_llama(vocab))
    expected = _logits(peft_model)
    out = tmp_path / "adapter"
    save_model(peft_model, tokenizer, out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "config.json").exists()
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(make_tiny_llama(vocab), out)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)


def test_save_lora_merged(tmp_path, tokenizer):
    vocab = len(tokenizer)
    peft_model = _perturbed_lora(make_tiny_llama(vocab))
    expected = _logits(peft_model)
    out = tmp_path / "merged"
    save_model(peft_model, tokenizer, out, merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged, "peft_config") or not merged.peft_config
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(make_tiny_llama(vocab), out / "adapter")
    torch.testing.assert_close(_logits(adapted), expected, rtol=0, atol=0)
    # the wrapper model itself is unchanged by merging a copy
    torch.testing.assert_close(_logits(peft_model), expected, rtol=0, atol=0)


def test_consuming_merge_writes_the_same_files(tmp_path, tokenizer):
    """consume=True (a run's final save) merges in place instead of on a deep copy: same files."""
    from safetensors.torch import load_file

    peft_model = _perturbed_lora(make_tiny_llama(len(tokenizer)))
    save_model(peft_model, tokenizer, tmp_path / "copy", merge_lora=True)
    assert any("lora_" in name for name, _ in peft_model.named_parameters())  # the copy left it adapted
    save_model(peft_model, tokenizer, tmp_path / "consumed", merge_lora=True, consume=True)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "copy" / name)), load_file(str(tmp_path / "consumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not any("lora_" in name for name, _ in peft_model.named_parameters())  # merged in place


def test_load_adapter_folder_merges_onto_base(tmp_path, tiny_model_dir, tokenizer):
    peft_model = _perturbed_lora(load_causal_lm(str(tiny_model_dir)))
    expected = _logits(peft_model)
    out = tmp_path / "adapter"
    save_model(peft_model, None, out)  # no tokenizer: load_tokenizer falls back to the base's
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tiny_model_dir.resolve())
    loaded = load_causal_lm(str(out))
    assert not hasattr(loaded, "peft_config") or not loaded.peft_config
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)
    assert load_tokenizer(str(out)).pad_token is not None


def test_resave_full_over_adapter_removes_stale_files(tmp_path, tiny_model, tokenizer):
    out = tmp_path / "out"
    save_model(_perturbed_lora(make_tiny_llama(len(tokenizer))), tokenizer, out)
    save_model(tiny_model, tokenizer, out)
    assert not (out / "adapter_config.json").exists()
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(tiny_model))


# ---------------------------------------------------------------- the real embedded model

@pytest.mark.slow
def test_embedded_model_cached_and_answers():
    name = embedded.EMBEDDED_NAME
    load_causal_lm(name)
    model = load_causal_lm(name)  # second load reads the de-quantised cache
    cached = cached_model_dir(name)
    assert (cached / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert getattr(model.config, "quantization_config", None) is None
    tok = load_tokenizer(name)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_frozen_linears_in_bf16_match_autocast_exactly(tiny_model):
    """Storing frozen projections in bf16 gives the same logits under bf16 autocast as casting them
    on every call (what autocast does), while trainable LoRA weights and the head stay fp32."""
    import copy

    from alignkit.models import add_lora, store_frozen_linears_in

    model = add_lora(copy.deepcopy(tiny_model), r=4)
    ids = torch.tensor([[5, 17, 300, 9, 44, 8]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    assert store_frozen_linears_in(model, torch.bfloat16) > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.get_output_embeddings().weight.dtype == torch.float32


def test_tokenizer_files_write_what_the_tokenizer_writes(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    from alignkit.models import TokenizerFiles

    tokenizer.save_pretrained(tmp_path / "live")
    files = TokenizerFiles.of(tokenizer)
    assert files.pad_token_id == tokenizer.pad_token_id is not None
    files.save_pretrained(tmp_path / "held")
    live = {p.relative_to(tmp_path / "live"): p.read_bytes() for p in (tmp_path / "live").rglob("*") if p.is_file()}
    held = {p.relative_to(tmp_path / "held"): p.read_bytes() for p in (tmp_path / "held").rglob("*") if p.is_file()}
    assert "tokenizer.json" in {str(k) for k in held} and held == live
    text = [{"role": "user", "content": "Name a colour."}]
    again = AutoTokenizer.from_pretrained(tmp_path / "held")
    assert again.apply_chat_template(text) == tokenizer.apply_chat_template(text)
    assert again.pad_token_id == tokenizer.pad_token_id
