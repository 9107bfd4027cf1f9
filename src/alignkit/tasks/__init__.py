"""Tasks for the demo: instructions with verifiable constraints, recoverable from the prompt text.

``constraints``: the constraint kinds (render / check / parse); ``bank``: the base instructions and
their answer keys; ``prompts``: deterministic prompt sets, the train / held-out split and the
shipped files ``sample_data/constraints_{train,eval}.jsonl``. The rubric labeler that judges
responses to these prompts is :mod:`alignkit.labeler`.
"""

from .bank import INSTRUCTIONS, POOLS, Instruction, lookup
from .constraints import (
    KINDS,
    AvoidWord,
    Constraint,
    EndPhrase,
    IncludeKeyword,
    ListItems,
    Lowercase,
    MaxSentences,
    MaxWords,
    NoCommas,
    StartWord,
    Uppercase,
    from_spec,
    instruction_text,
    parse_constraints,
)
from .prompts import make_prompts, split, split_instructions, write_sample_data

__all__ = [
    "INSTRUCTIONS", "KINDS", "POOLS", "AvoidWord", "Constraint", "EndPhrase", "IncludeKeyword", "Instruction",
    "ListItems", "Lowercase", "MaxSentences", "MaxWords", "NoCommas", "StartWord", "Uppercase", "from_spec",
    "instruction_text", "lookup", "make_prompts", "parse_constraints", "split", "split_instructions",
    "write_sample_data",
]
