"""Verifiable constraints on a response: each renders to one sentence and is parsed back from it.

A constraint is appended to an instruction as a sentence ("Answer in at most 12 words.") and has a
``check(response) -> bool``. The judge is called as ``judge(prompt, response)`` with text only, so
every constraint is recoverable from the prompt: :func:`parse_constraints` finds the rendered
sentences with regexes (render -> parse gives the same constraint back; tested for every kind).
The phrasing follows the shipped preference data (``sample_data/prefs.jsonl``), so it parses too.

How the checks read a response (the rules the rubric labeler applies):

==================  =========================================================  ===========================
kind                sentence                                                   passes when
==================  =========================================================  ===========================
max_words N         Answer in at most N words.                                 1 <= words <= N
max_sentences N     Answer in at most N sentences.                             1 <= sentences <= N
include_keyword K   Include the word 'K' in your answer.                       K occurs as a whole word
avoid_word W        Do not use the word 'W' in your answer.                    W never occurs as a whole word
lowercase           Answer in all lowercase letters.                           a letter, no capital letter
uppercase           Answer in all capital letters.                             a letter, no small letter
end_phrase P        End your answer with the phrase 'P'                        text ends with P
list_items N        Answer as a bulleted list with exactly N items.            exactly N item lines
start_word W        Begin your answer with the word 'W'.                       the first word is W
no_commas           Do not use any commas in your answer.                      no comma
==================  =========================================================  ===========================

* A **word** is a whitespace-separated token holding a letter or digit ("well-known", "H2O" and
  "it's" are one word each; a bullet "-" is none). A response with no word satisfies no constraint.
* A **sentence** is a stretch of text ended by ``.``, ``!`` or ``?`` followed by whitespace or the
  end, or by a line break, that holds a word ("3.5" does not end a sentence; "Dr. Who" is two).
* Keywords (include, avoid, start) match **whole words, ignoring case**: "Cat," and "cat's" contain
  "cat"; "category" and "cats" do not.
* The end phrase ignores case (as IFEval does) and trailing whitespace, nothing else: a period
  added after the phrase, or quotes around it, fail.
* A list **item** is a line starting with ``-``, ``*``, ``•``, ``1.`` or ``1)`` and a space, then
  text; other lines (an intro sentence) are allowed. Markdown bold ``**x**`` is not a bullet.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

_WORD_CHAR = re.compile(r"[^\W_]")  # a letter or a digit (any script)
_Q = r"['\"‘’“”]"                   # a quote mark of either kind, as prompts may be typed


def words(text: str) -> list[str]:
    """Whitespace-separated tokens that hold a letter or a digit."""
    return [t for t in text.split() if _WORD_CHAR.search(t)]


def sentences(text: str) -> list[str]:
    """Pieces of text ended by ./!/? + whitespace (or the end), or by a line break, that hold a word."""
    pieces = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in pieces if _WORD_CHAR.search(p)]


def has_word(text: str) -> bool:
    return bool(_WORD_CHAR.search(text))


def contains_word(text: str, word: str) -> bool:
    """``word`` (one or more words) occurs in ``text`` as a whole word, ignoring case."""
    pattern = r"(?<![^\W_])" + re.escape(word.strip()).replace(r"\ ", r"\s+") + r"(?![^\W_])"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)


def list_items(text: str) -> int:
    """How many lines are list items (bulleted with - * • or numbered 1. / 1))."""
    return len(_ITEM.findall(text))


# ----------------------------------------------------------------------------- the constraint kinds

class Constraint:
    """Base of the kinds: ``render()``, ``check(response)``, ``spec()``; PATTERN parses ``render()``."""

    kind: ClassVar[str]
    PATTERN: ClassVar[re.Pattern]

    def render(self) -> str:
        raise NotImplementedError

    def _passes(self, response: str) -> bool:
        raise NotImplementedError

    def check(self, response: str) -> bool:
        """Whether ``response`` satisfies the constraint (a response with no word satisfies none)."""
        return has_word(response) and self._passes(response)

    def spec(self) -> dict:
        """A JSON-able description: ``{"kind": ..., <parameters>}`` (inverse of :func:`from_spec`)."""
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_match(cls, m: re.Match) -> Constraint:
        return cls()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class MaxWords(Constraint):
    n: int
    kind: ClassVar[str] = "max_words"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Answer in at most (\d+) words?\.", re.IGNORECASE)

    def render(self) -> str:
        return f"Answer in at most {_plural(self.n, 'word')}."

    def _passes(self, response: str) -> bool:
        return len(words(response)) <= self.n

    @classmethod
    def from_match(cls, m):
        return cls(int(m.group(1)))


@dataclass(frozen=True)
class MaxSentences(Constraint):
    n: int
    kind: ClassVar[str] = "max_sentences"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Answer in at most (\d+) sentences?\.", re.IGNORECASE)

    def render(self) -> str:
        return f"Answer in at most {_plural(self.n, 'sentence')}."

    def _passes(self, response: str) -> bool:
        return len(sentences(response)) <= self.n

    @classmethod
    def from_match(cls, m):
        return cls(int(m.group(1)))


@dataclass(frozen=True)
class IncludeKeyword(Constraint):
    keyword: str
    kind: ClassVar[str] = "include_keyword"
    PATTERN: ClassVar[re.Pattern] = re.compile(rf"Include the word {_Q}([^'\"‘’“”]+){_Q} in your answer\.",
                                               re.IGNORECASE)

    def render(self) -> str:
        return f"Include the word '{self.keyword}' in your answer."

    def _passes(self, response: str) -> bool:
        return contains_word(response, self.keyword)

    @classmethod
    def from_match(cls, m):
        return cls(m.group(1))


@dataclass(frozen=True)
class AvoidWord(Constraint):
    word: str
    kind: ClassVar[str] = "avoid_word"
    PATTERN: ClassVar[re.Pattern] = re.compile(rf"Do not use the word {_Q}([^'\"‘’“”]+){_Q} in your answer\.",
                                               re.IGNORECASE)

    def render(self) -> str:
        return f"Do not use the word '{self.word}' in your answer."

    def _passes(self, response: str) -> bool:
        return not contains_word(response, self.word)

    @classmethod
    def from_match(cls, m):
        return cls(m.group(1))


@dataclass(frozen=True)
class Lowercase(Constraint):
    kind: ClassVar[str] = "lowercase"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Answer in all lowercase letters\.", re.IGNORECASE)

    def render(self) -> str:
        return "Answer in all lowercase letters."

    def _passes(self, response: str) -> bool:
        return any(c.isalpha() for c in response) and not any(c.isupper() for c in response)


@dataclass(frozen=True)
class Uppercase(Constraint):
    kind: ClassVar[str] = "uppercase"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Answer in all capital letters\.", re.IGNORECASE)

    def render(self) -> str:
        return "Answer in all capital letters."

    def _passes(self, response: str) -> bool:
        return any(c.isalpha() for c in response) and not any(c.islower() for c in response)


@dataclass(frozen=True)
class EndPhrase(Constraint):
    phrase: str
    kind: ClassVar[str] = "end_phrase"
    # the phrase may hold apostrophes, so it runs to the quote that ends the sentence
    PATTERN: ClassVar[re.Pattern] = re.compile(
        rf"End your answer with the (?:exact )?phrase {_Q}(.+?){_Q}(?=\.?(?:\s|$))\.?", re.IGNORECASE)

    def render(self) -> str:
        return f"End your answer with the phrase '{self.phrase}'"

    def _passes(self, response: str) -> bool:
        return response.rstrip().lower().endswith(self.phrase.strip().lower())

    @classmethod
    def from_match(cls, m):
        return cls(m.group(1))


@dataclass(frozen=True)
class ListItems(Constraint):
    n: int
    kind: ClassVar[str] = "list_items"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Answer as a bulleted list with exactly (\d+) items?\.", re.IGNORECASE)

    def render(self) -> str:
        return f"Answer as a bulleted list with exactly {_plural(self.n, 'item')}."

    def _passes(self, response: str) -> bool:
        return list_items(response) == self.n

    @classmethod
    def from_match(cls, m):
        return cls(int(m.group(1)))


@dataclass(frozen=True)
class StartWord(Constraint):
    word: str
    kind: ClassVar[str] = "start_word"
    PATTERN: ClassVar[re.Pattern] = re.compile(rf"Begin your answer with the word {_Q}([^'\"‘’“”]+){_Q}\.",
                                               re.IGNORECASE)

    def render(self) -> str:
        return f"Begin your answer with the word '{self.word}'."

    def _passes(self, response: str) -> bool:
        first = re.match(r"[\W_]*([^\W_]+)", response)  # skip leading quotes, bullets, markdown
        return first is not None and first.group(1).lower() == self.word.lower()

    @classmethod
    def from_match(cls, m):
        return cls(m.group(1))


@dataclass(frozen=True)
class NoCommas(Constraint):
    kind: ClassVar[str] = "no_commas"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Do not use any commas in your answer\.", re.IGNORECASE)

    def render(self) -> str:
        return "Do not use any commas in your answer."

    def _passes(self, response: str) -> bool:
        return "," not in response and "，" not in response


KINDS: dict[str, type[Constraint]] = {cls.kind: cls for cls in (
    MaxWords, MaxSentences, IncludeKeyword, AvoidWord, Lowercase, Uppercase, EndPhrase, ListItems, StartWord,
    NoCommas)}


def from_spec(spec: dict) -> Constraint:
    """``{"kind": ..., <parameters>}`` -> the constraint (ValueError on an unknown kind or parameters)."""
    cls = KINDS.get(spec.get("kind"))
    if cls is None:
        raise ValueError(f"unknown constraint kind {spec.get('kind')!r}; known: {', '.join(KINDS)}")
    params = {k: v for k, v in spec.items() if k != "kind"}
    names = {f.name for f in fields(cls)}
    if set(params) != names:
        raise ValueError(f"constraint {cls.kind} takes {sorted(names)}, got {sorted(params)}")
    return cls(**params)


# ----------------------------------------------------------------------------- reading a prompt

def _matches(prompt: str) -> list[tuple[int, int, Constraint]]:
    found = [(m.start(), m.end(), cls.from_match(m)) for cls in KINDS.values() for m in cls.PATTERN.finditer(prompt)]
    return sorted(found, key=lambda t: t[0])


def parse_constraints(prompt: str) -> list[Constraint]:
    """The constraints stated in ``prompt``, in the order they appear (none: an empty list)."""
    return [c for _, _, c in _matches(prompt)]


def instruction_text(prompt: str) -> str:
    """``prompt`` with its constraint sentences removed and whitespace collapsed: the bare task."""
    out, pos = [], 0
    for start, end, _ in _matches(prompt):
        if start >= pos:
            out.append(prompt[pos:start])
            pos = end
    out.append(prompt[pos:])
    return " ".join("".join(out).split())
