"""Typed configs, one per concern. Field descriptions become the CLI's ``--help``.

Every field is a flag (``max_prompt_length`` -> ``--max-prompt-length``) and a key of the
``--config FILE.yaml`` file; the YAML may be flat or grouped by concern (``model:``,
``data:``, ``train:``, ``dpo:``). Precedence: defaults < YAML < command line. The resolved
config is saved with the run as ``config.yaml``, grouped by concern.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError
from .precision import resolve as _resolve_precision

# fp32, bf16 autocast, or auto (bf16 where the hardware has it natively, else fp32: alignkit.precision);
# "auto" is resolved when the config is built, so every run sees, and config.yaml records, fp32 or bf16
Precision = Annotated[Literal["fp32", "bf16", "auto"], AfterValidator(_resolve_precision)]
_AUTO = "; auto = bf16 where the CPU/GPU has native bf16 (AVX512-BF16, AMX), else fp32"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    model: str = Field(description="policy to train: a local folder, a hub id, a .gguf file, or 'smollm2-135m-instruct'")
    trust_remote_code: bool = Field(False, description="allow model code from the model folder/hub (off unless you turn it on)")
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tuning")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha (default 2 x rank)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    merge: bool = Field(False, description="with LoRA: also write merged full weights to the output folder")
    precision: Precision = Field("fp32", description="fp32, or bf16 autocast (weights and optimizer stay fp32)" + _AUTO)
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")


class DataConfig(_Section):
    data: list[str] = Field(description="training data: .jsonl/.json/.parquet/.csv files, a saved HF dataset folder, or a hub dataset name")
    eval_data: list[str] | None = Field(None, description="held-out data, evaluated every --eval-every steps and at the end")
    max_length: int = Field(512, ge=2, description="max tokens of prompt + completion (completions are cut from the end)")
    max_prompt_length: int = Field(256, ge=1, description="max prompt tokens (the END of the prompt is kept)")
    chat_template_for_plain: bool = Field(False, description="render plain-string prompts with the tokenizer's chat template too")
    skip_invalid: bool = Field(False, description="skip bad rows (and report how many of each kind) instead of stopping")

    @field_validator("data", "eval_data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class TrainConfig(_Section):
    output_dir: Path = Field(description="where the model, config.yaml, metrics.jsonl and checkpoints/ go")
    max_steps: int = Field(-1, description="optimizer steps; > 0 overrides --epochs")
    epochs: float = Field(1.0, gt=0, description="passes over the data (fractions allowed)")
    batch_size: int = Field(4, ge=1, description="examples (pairs) per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-6, gt=0, description="peak learning rate (AdamW); per-command defaults: dpo 5e-6, "
                                               "sft 2e-5, rm 1e-5, ppo/grpo 3e-6")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of steps for linear warm-up")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 = no clipping")
    seed: int = Field(42, description="seed for initialisation and data order")
    log_every: int = Field(10, ge=1, description="log metrics every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate on --eval-data every N steps; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="write checkpoints/step-N every N steps; 0 = none")
    save_limit: int | None = Field(None, ge=1, description="keep only the newest N checkpoints")
    resume: bool = Field(False, description="continue from the newest checkpoint in --output-dir")
    overwrite: bool = Field(False, description="replace a run already in --output-dir")
    progress: bool = Field(True, description="show a progress bar")
    fsdp: bool = Field(False, description="under torchrun / accelerate launch: shard weights, gradients and "
                                          "optimizer state over processes (FSDP2) instead of replicating them")


class DPOConfig(_Section):
    ref_model: str | None = Field(None, description="reference model (default: the starting policy; with LoRA, the base with adapters disabled)")
    loss: str = Field("dpo", description="dpo, cdpo, ipo, simpo, dpop, hinge or robust")
    beta: float | None = Field(None, gt=0, description="beta (default per loss: 0.1; simpo 2.0)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO / robust DPO: probability a label is flipped "
                                                                "(0: 0.1 for cdpo and robust; dpo takes it too)")
    gamma: float = Field(1.0, ge=0, description="SimPO target margin, in reward units")
    lam: float = Field(50.0, ge=0, description="DPO-Positive lambda")
    ref_cache: bool = Field(True, description="compute reference log-probs once before training and cache them on disk")
    layout: Literal["shared", "packed", "padded"] = Field(
        "shared", description="batch layout: shared = each pair's prompt run once for both completions, packed = "
                              "sequences end to end without padding, padded = one padded row per sequence; the first "
                              "two are checked on the model against padded before training (fallback: padded)")


class SFTConfig(_Section):
    packing: bool = Field(False, description="pack several examples end to end into one row (no attention or loss "
                                             "across examples) instead of padding each")
    completion_only_loss: bool = Field(True, description="loss on completion (assistant) tokens only; off = on every "
                                                         "real token, prompt included")


class RMConfig(_Section):
    margin_scale: float = Field(0.0, ge=0, description="margin = scale x score gap between the two responses "
                                                       "(scores or Likert rows; Llama 2's margin loss); 0 = none")
    center_rewards_coef: float = Field(0.0, ge=0, description="reward centring: adds coef x mean(r^2) over each "
                                                              "prompt's responses so scores stay near 0")
    rubric_weights: Path | None = Field(None, description="YAML/JSON mapping rubric field -> weight for turning rubric "
                                                          "labels into a ranking (default: alignkit.rubric.DEFAULT_WEIGHTS)")


class ScoreConfig(_Section):
    reward_model: str = Field(description="a reward model folder written by `alignkit rm` (or any HF sequence-"
                                          "classification model with one label)")
    data: list[str] = Field(description="rows to score: prompt/response, prompt/responses (K-wise) or preference pairs")
    output: Path = Field(description="JSONL file to write: each input row plus its score(s)")
    batch_size: int = Field(8, ge=1, description="sequences per forward")
    max_length: int = Field(512, ge=2, description="max tokens of prompt + response")
    max_prompt_length: int = Field(256, ge=1, description="max prompt tokens (the END of the prompt is kept)")
    chat_template_for_plain: bool = Field(False, description="render plain-string prompts with the chat template")
    precision: Precision = Field("fp32", description="fp32, or bf16 autocast" + _AUTO)
    trust_remote_code: bool = Field(False, description="allow model code from the model folder")
    progress: bool = Field(True, description="show a progress bar")
    overwrite: bool = Field(False, description="replace an existing --output file")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


class RolloutConfig(_Section):
    reward_model: str | None = Field(None, description="the judge (required by ppo and grpo): a reward-model folder from "
                                                       "`alignkit rm`, or a Python function 'module:function' / "
                                                       "'path/file.py:function' with reward(prompt, response) -> float")
    max_new_tokens: int = Field(64, ge=1, description="the horizon T: most tokens sampled per response")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs are of the tempered policy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set with probability >= p")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens; 0 = all")
    missing_eos_penalty: float = Field(0.0, description="added to the score of a response that hits the horizon "
                                                         "without EOS (e.g. -1.0); 0 = off")
    reward_clip: float | None = Field(None, gt=0, description="clip judge scores to [-c, c]")
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the KL to the reference (initial value if adaptive)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator: k1 = log pi - log pi_ref, "
                                                                      "k2 = half its square, k3 = (r - 1) - log r")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    mini_batch_size: int = Field(8, ge=1, description="responses per optimisation step within a rollout batch")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip epsilon")
    judge_batch_size: int = Field(16, ge=1, description="responses per reward-model forward")


class PPOConfig(_Section):
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    target_kl: float | None = Field(None, gt=0, description="adaptive KL controller target (Ziegler et al.); none = fixed beta")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL controller horizon, in responses")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    clip_value: float = Field(0.2, gt=0, description="value clipping range")
    whiten_advantages: bool = Field(True, description="normalise advantages per rollout batch")
    value_model: Literal["separate", "shared"] = Field(
        "separate", description="separate = own weights (a copy of --value-init); shared = a value head on the policy's backbone")
    value_init: str | None = Field(None, description="weights the separate value model starts from (default: the reward "
                                                     "model when it is a folder, else the policy)")
    ptx_data: list[str] | None = Field(None, description="PPO-ptx: pretraining text ({'text'} rows or prompt/completion) "
                                                         "whose LM loss is mixed into each update")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx gamma: weight of the pretraining LM loss")

    @field_validator("ptx_data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


class GRPOConfig(_Section):
    num_generations: int = Field(4, ge=2, description="K: responses sampled per prompt (the group)")
    baseline: Literal["mean", "loo"] = Field("mean", description="mean = GRPO (group mean), loo = RLOO (leave-one-out mean)")
    scale_rewards: bool = Field(True, description="divide advantages by the group's std (GRPO); off = Dr. GRPO / RLOO")


class SamplingConfig(_Section):
    num_responses: int = Field(4, ge=1, description="responses sampled per prompt (N, or K)")
    max_new_tokens: int = Field(64, ge=1, description="most tokens sampled per response")
    temperature: float = Field(0.8, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set with probability >= p")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens; 0 = all")
    gen_batch_size: int = Field(8, ge=1, description="prompts per generation batch")


class GenerateConfig(_Section):
    model: str = Field(description="the policy to sample from (folder, hub id, .gguf, or 'smollm2-135m-instruct')")
    data: list[str] = Field(description="prompts: any rows with a 'prompt' (string or messages)")
    output: Path = Field(description="JSONL file to write")
    reward_model: str | None = Field(None, description="the judge (best-of-n, rso): a reward-model folder or 'module:function'")
    max_prompt_length: int = Field(256, ge=1, description="max prompt tokens (the END of the prompt is kept)")
    chat_template_for_plain: bool = Field(False, description="render plain-string prompts with the chat template")
    skip_invalid: bool = Field(False, description="skip bad rows (and report them) instead of stopping")
    rso_beta: float = Field(0.5, gt=0, description="rso: beta of the target policy pi_ref * exp(r / beta)")
    num_accept: int = Field(2, ge=2, description="rso: responses accepted per prompt (then paired for DPO)")
    seed: int = Field(42, description="sampling seed")
    precision: Precision = Field("fp32", description="fp32, or bf16 autocast" + _AUTO)
    trust_remote_code: bool = Field(False, description="allow model code from the model folder")
    overwrite: bool = Field(False, description="replace an existing --output file")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


class OnlineDPOConfig(_Section):
    reward_model: str = Field(description="the judge that ranks each round's samples: a reward-model folder or 'module:function'")
    rounds: int = Field(2, ge=1, description="sample -> rank -> DPO rounds")
    reference: Literal["round", "fixed"] = Field("round", description="DPO reference: each round's starting policy, "
                                                                      "or the initial model throughout")
    pairs: Literal["best-worst", "all"] = Field("best-worst", description="pairs per prompt: the best against the "
                                                                           "worst response, or every untied pair")


class IterateConfig(_Section):
    labeler: str = Field(description="who labels each round's samples (the 'human'): a reward-model folder or "
                                     "'module:function'; its scores rank the K responses")
    rounds: int = Field(2, ge=1, description="sample -> label -> retrain RM on all labels so far -> PPO rounds")
    num_responses: int = Field(4, ge=2, le=9, description="K responses per prompt to label")
    rm_steps: int = Field(50, ge=1, description="reward-model optimizer steps per round")
    rm_lr: float = Field(1e-4, gt=0, description="reward-model learning rate")
    rm_batch_size: int = Field(4, ge=1, description="prompts (with their K responses) per reward-model batch")


class EvalConfig(_Section):
    model: str = Field(description="model A, the one evaluated: a folder (full model or LoRA adapter), hub id, .gguf, "
                                   "or 'smollm2-135m-instruct'")
    baseline: str = Field(description="model B, compared against (e.g. the SFT start)")
    judge: str = Field(description="who judges each response: 'rubric' (the rubric labeler, alignkit.labeler), a "
                                   "reward-model folder, or a function 'module:function' / 'file.py:function'")
    data: list[str] = Field(description="prompts: any rows with a 'prompt' (string or messages)")
    output_dir: Path = Field(description="where judgements.jsonl, summary.json and table.md go")
    reference: str | None = Field(None, description="the reference of the KL column (default: the baseline)")
    max_prompts: int = Field(0, ge=0, description="evaluate only the first N prompts; 0 = all")
    max_prompt_length: int = Field(256, ge=1, description="max prompt tokens (the END of the prompt is kept)")
    chat_template_for_plain: bool = Field(True, description="render plain-string prompts with the chat template "
                                                            "(the judge always sees the plain text)")
    skip_invalid: bool = Field(False, description="skip bad rows (and report them) instead of stopping")
    seed: int = Field(42, description="sampling seed (the same for both models)")
    precision: Precision = Field("auto", validate_default=True, description="fp32, or bf16 autocast for sampling" + _AUTO)
    trust_remote_code: bool = Field(False, description="allow model code from the model folders")
    overwrite: bool = Field(False, description="replace an evaluation already in --output-dir")
    progress: bool = Field(True, description="show progress bars")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


class PipelineConfig(_Section):
    model: str = Field("smollm2-135m-instruct", description="the SFT start (or the base for --sft-data): a folder, hub "
                                                           "id, .gguf, or 'smollm2-135m-instruct'")
    output_dir: Path = Field(Path("runs/demo"), description="every stage's outputs, the report and report.md")
    quick: bool = Field(False, description="a short version: fewer prompts, tokens and steps")
    train_prompts: list[str] | None = Field(None, description="prompts to sample and label (default: the shipped "
                                                              "constraint instructions, constraints_train.jsonl)")
    eval_prompts: list[str] | None = Field(None, description="held-out prompts (default: constraints_eval.jsonl)")
    num_train_prompts: int | None = Field(None, ge=0, description="use the first N training prompts; 0 = all "
                                                                  "(default: 160, --quick 48)")
    num_eval_prompts: int | None = Field(None, ge=0, description="use the first N held-out prompts; 0 = all "
                                                                 "(default: 200, --quick 40)")
    sft_data: list[str] | None = Field(None, description="optional SFT stage on these demonstrations first")
    judge: str = Field("rubric", description="the gold judge that labels the samples and judges the evaluation: "
                                             "'rubric' (alignkit.labeler) or 'module:function'")
    methods: list[str] | None = Field(None, description="methods to train: ppo, grpo and any DPO-family loss of "
                                                        "`alignkit dpo` (default: ppo dpo cdpo ipo simpo; --quick: "
                                                        "ppo dpo)")
    num_responses: int = Field(4, ge=2, le=9, description="K responses sampled per training prompt")
    max_new_tokens: int | None = Field(None, ge=1, description="response horizon (default 40, --quick 40)")
    temperature: float = Field(0.8, gt=0, description="sampling temperature for the preference data and PPO")
    eval_temperature: float = Field(0.7, gt=0, description="sampling temperature of the evaluation")
    lora_r: int = Field(16, ge=0, description="LoRA rank of every trained model; 0 = full fine-tuning")
    precision: Precision = Field("auto", validate_default=True, description="bf16 autocast (weights stay fp32) or fp32" + _AUTO)
    rm_steps: int | None = Field(None, ge=1, description="reward-model steps (default 36, --quick 12)")
    rl_steps: int | None = Field(None, ge=1, description="PPO/GRPO steps (default 16, --quick 4)")
    dpo_steps: int | None = Field(None, ge=1, description="steps per DPO-family method (default 26, --quick 12)")
    rm_lr: float = Field(1e-3, gt=0, description="reward-model learning rate (LoRA; the new score head trains in full)")
    rl_lr: float = Field(3e-4, gt=0, description="PPO/GRPO learning rate (LoRA)")
    dpo_lr: float = Field(5e-4, gt=0, description="DPO-family learning rate (LoRA)")
    pairs: Literal["best-worst", "all"] = Field("best-worst", description="DPO pairs per prompt: the labeler's best "
                                                                          "against its worst response, or every untied pair")
    beta: float = Field(0.1, gt=0, description="DPO beta (SimPO uses its own default)")
    kl_coef: float = Field(0.02, ge=0, description="PPO's KL coefficient")
    seed: int = Field(42, description="seed for sampling and training")
    progress: bool = Field(True, description="show progress bars")
    overwrite: bool = Field(False, description="recompute every stage instead of resuming finished ones")

    @field_validator("train_prompts", "eval_prompts", "sft_data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, Path)) else v


SECTIONS: dict[str, dict[str, type[_Section]]] = {
    "dpo": {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "dpo": DPOConfig},
    "sft": {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "sft": SFTConfig},
    "rm": {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "rm": RMConfig},
    "score": {"score": ScoreConfig},
    "ppo": {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "rollout": RolloutConfig, "ppo": PPOConfig},
    "grpo": {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "rollout": RolloutConfig, "grpo": GRPOConfig},
    "generate": {"generate": GenerateConfig, "sampling": SamplingConfig},
    "best-of-n": {"generate": GenerateConfig, "sampling": SamplingConfig},
    "rso": {"generate": GenerateConfig, "sampling": SamplingConfig},
    "online-dpo": {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "dpo": DPOConfig,
                   "sampling": SamplingConfig, "online": OnlineDPOConfig},
    "iterated-rlhf": {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "rollout": RolloutConfig,
                      "ppo": PPOConfig, "iterate": IterateConfig},
    "eval": {"eval": EvalConfig, "sampling": SamplingConfig},
    "demo": {"pipeline": PipelineConfig},
    "pipeline": {"pipeline": PipelineConfig},
}

# Defaults that differ per command (a flag or the YAML still overrides them).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"lr": 2e-5}, "rm": {"lr": 1e-5},
    "ppo": {"lr": 3e-6, "batch_size": 8},
    "grpo": {"lr": 3e-6, "batch_size": 2, "ppo_epochs": 1, "kl_coef": 0.04, "kl_estimator": "k3"},
    "eval": {"num_responses": 1, "temperature": 0.7, "gen_batch_size": 32},
}


def flatten_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML config: (flat {field: value}, {field: line}). Grouped sections are flattened."""
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise InputError("config file not found", file=str(path), field="config") from None
    except OSError as e:  # a folder, no permission, ...
        raise InputError(f"cannot read the config file: {e.strerror or e}", file=str(path), field="config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise InputError(f"not valid YAML: {getattr(e, 'problem', e)}", file=str(path),
                         line=None if line is None else line + 1, field="config") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise InputError("a config file must be a mapping of field: value", file=str(path), line=1, field="config")
    flat: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in root.value:
        key = str(key_node.value).replace("-", "_")
        if isinstance(data.get(key_node.value), dict):  # a section: model:, data:, ...
            for k2, _ in value_node.value:
                name = str(k2.value).replace("-", "_")
                flat[name] = data[key_node.value][k2.value]
                lines[name] = k2.start_mark.line + 1
        else:
            flat[key] = data[key_node.value]
            lines[key] = key_node.start_mark.line + 1
    return flat, lines


def build_config(command: str, values: dict[str, Any],
                 origins: dict[str, tuple[str, int | None]] | None = None) -> dict[str, _Section]:
    """Validate flat ``values`` into the command's sections. Errors -> InputError (exit 2) that name
    where the bad value came from: ``origins[field] = (file or "command line", line)``."""
    origins = origins or {}
    values = {**COMMAND_DEFAULTS.get(command, {}), **values}
    sections = SECTIONS[command]
    known = {name for cls in sections.values() for name in cls.model_fields}

    def where(field: str) -> dict:
        src, line = origins.get(field, ("command line", None))
        return {"file": src, "line": line, "field": field}

    for key in values:
        if key not in known:
            raise InputError(f"unknown setting; valid ones: {', '.join(sorted(known))}", **where(key))
    built: dict[str, _Section] = {}
    for section, cls in sections.items():
        mine = {k: v for k, v in values.items() if k in cls.model_fields}
        try:
            built[section] = cls(**mine)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else section
            msg = "is required" if err["type"] == "missing" else f"{err['msg']} (got {err.get('input')!r})"
            raise InputError(msg, **where(field)) from None
    return built


def dump_config(sections: dict[str, _Section], path: Path) -> None:
    """Write the resolved config, grouped by concern, as YAML that ``--config`` reads back."""
    data = {name: sec.model_dump(mode="json") for name, sec in sections.items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
