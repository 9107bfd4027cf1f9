"""`alignkit <command>`: build a typed config from flags and --config YAML, call one recipe, exit.

Exit codes (DESIGN.md): 0 done; 2 bad input or config (one message naming file, line and
field, never a traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from .config import COMMAND_DEFAULTS, SECTIONS, build_config, flatten_yaml
from .errors import InputError, NonFiniteError

COMMANDS = {
    "sft": "supervised fine-tuning on demonstrations (prompt/completion or conversations)",
    "rm": "train a reward model (scalar head) on preference pairs or K-wise rankings",
    "dpo": "direct preference optimisation (DPO, cDPO, IPO, SimPO, DPO-Positive, hinge, robust)",
    "score": "score responses with a reward model and write them as JSONL",
    "ppo": "RLHF with PPO against a reward model or a reward function (KL penalty to the reference, GAE, PPO-ptx)",
    "grpo": "group-relative policy gradient, GRPO or RLOO (--baseline loo): K samples per prompt, no value model",
    "generate": "sample N responses per prompt (KV cache) and write {prompt, responses} JSONL",
    "best-of-n": "rejection sampling: keep the judge's best of N responses per prompt (an SFT dataset)",
    "rso": "statistical rejection sampling (RSO): accepted samples of pi_sft*exp(r/beta), paired for DPO",
    "online-dpo": "iterative / online DPO: rounds of sample K -> rank with the judge -> DPO on the new pairs",
    "iterated-rlhf": "rounds of sample -> label -> retrain the reward model on all labels -> PPO",
    "eval": "win rate of model A's responses against model B's on a prompt set, judged (95% interval)",
    "demo": "the whole pipeline on the embedded model: sample, label, reward model, PPO, DPO family, evaluate, report",
    "pipeline": "the demo's pipeline for any model and prompt set (--config FILE.yaml)",
}

LABEL_HELP = "the labeling web app: `label serve` (rank and score K responses), `label export`, `label stats`"


def _flag_type(annotation: Any):
    """argparse type and nargs for a pydantic field annotation."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if get_origin(annotation) in (Union, UnionType) and args else annotation  # X | None -> X
    if get_origin(base) is list:
        return str, "+"
    if get_origin(base) is not None:  # Literal[...]
        return str, None
    return (base if base in (int, float) else str), None


def _add_fields(parser: argparse.ArgumentParser, command: str) -> None:
    overrides = COMMAND_DEFAULTS.get(command, {})
    for section, cls in SECTIONS[command].items():
        group = parser.add_argument_group(section)
        for name, info in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            default = "required" if info.is_required() else f"default: {overrides.get(name, info.default)}"
            help_text = f"{info.description} ({default})"
            if info.annotation is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=help_text)
            else:
                typ, nargs = _flag_type(info.annotation)
                group.add_argument(flag, type=typ, nargs=nargs, default=argparse.SUPPRESS, help=help_text,
                                   metavar=name.upper())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors are bad input too: exit 2, one line
        raise InputError(message, file="command line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignkit", description="Align language models with human preferences.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("label", help=LABEL_HELP, add_help=False)  # its own parser: alignkit.label.cli
    for command, help_text in COMMANDS.items():
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        p = sub.add_parser(command, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=None, help="YAML file of settings; flags override it")
        _add_fields(p, command)
    return parser


def parse(argv: list[str]) -> tuple[str, dict]:
    """(command, validated config sections) from the command line and the --config file."""
    ns = vars(build_parser().parse_args(argv))
    command = ns.pop("command")
    config_file = ns.pop("config", None)
    values: dict[str, Any] = {}
    origins: dict[str, tuple[str, int | None]] = {}
    if config_file is not None:
        values, lines = flatten_yaml(config_file)
        origins = {k: (str(config_file), lines.get(k)) for k in values}
    for k, v in ns.items():  # flags override the file
        values[k] = v
        origins[k] = ("command line", None)
    return command, build_config(command, values, origins)


@contextlib.contextmanager
def quiet_library_progress(sections: dict):
    """With ``--no-progress`` the libraries' bars are off too for the run (transformers' "Loading
    weights", "Writing model shards"; huggingface_hub's downloads), not only alignkit's own; their
    earlier state is restored afterwards."""
    if all(getattr(section, "progress", True) for section in sections.values()):
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_off, hf_was_on = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if hf_was_on:
            hf_logging.enable_progress_bar()
        if not hub_was_off:
            enable_progress_bars()


def run(command: str, sections: dict) -> Path:
    if command == "dpo":
        from .train.dpo import run_dpo
        return run_dpo(sections["model"], sections["data"], sections["train"], sections["dpo"])
    if command == "sft":
        from .train.sft import run_sft
        return run_sft(sections["model"], sections["data"], sections["train"], sections["sft"])
    if command == "rm":
        from .train.reward import run_rm
        return run_rm(sections["model"], sections["data"], sections["train"], sections["rm"])
    if command == "ppo":
        from .train.ppo import run_ppo
        return run_ppo(sections["model"], sections["data"], sections["train"], sections["rollout"], sections["ppo"])
    if command == "grpo":
        from .train.grpo import run_grpo
        return run_grpo(sections["model"], sections["data"], sections["train"], sections["rollout"], sections["grpo"])
    if command in ("generate", "best-of-n", "rso"):
        from .train.online import run_generate
        return run_generate(sections["generate"], sections["sampling"], mode=command)
    if command == "online-dpo":
        from .train.online import run_online_dpo
        return run_online_dpo(sections["model"], sections["data"], sections["train"], sections["dpo"],
                              sections["sampling"], sections["online"])
    if command == "iterated-rlhf":
        from .train.online import run_iterated_rlhf
        return run_iterated_rlhf(sections["model"], sections["data"], sections["train"], sections["rollout"],
                                 sections["ppo"], sections["iterate"])
    if command in ("demo", "pipeline"):
        from .demo.pipeline import run_pipeline
        return run_pipeline(sections["pipeline"])
    if command == "eval":
        from .eval.run import run_eval
        return run_eval(sections["eval"], sections["sampling"])
    if command == "score":
        from .score import run_score
        return run_score(sections["score"])
    raise InputError(f"unknown command {command!r}", file="command line")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft asks transformers a deprecated question on every LoRA forward; the warning is theirs, not the user's
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from .memory import return_freed_memory_to_os
    from .train.run import shutdown

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["label"]:
        from .label.cli import main as label_main
        return label_main(argv[1:])
    return_freed_memory_to_os()
    try:
        command, sections = parse(argv)
        with quiet_library_progress(sections):
            out = run(command, sections)
        if os.environ.get("RANK", "0") == "0":
            print(f"done: {out}")
        return 0
    except InputError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"alignkit: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 1
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
