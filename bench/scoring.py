"""Exact-match scoring of generated answers, and a check of how a tokenizer splits the keys.

A passkey answer is right when the first number the model writes *is* the key: " 71432." and
"71432" match, "714321" (a longer number containing the key), "-71432", "71432.5" and "7143" do
not. The comparison is on the digit string, so a key with leading zeros ("00714") must be written
with them (the prompt shows them). Thousands separators are removed ("71,432" -> "71432"): that is
the same integer written another way, not a different answer.

Scores are only comparable across models when the key reaches the model as the same kind of tokens
(one token per digit for SmolLM2/Llama-3-style tokenizers, merged chunks for others), so
``number_tokenization`` reports how a tokenizer encodes a key in context.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# ASCII digits only: \d would also accept other scripts' digits, which are never a key.
# A number: an optional minus sign, digits (comma groups of exactly three digits allowed) and an
# optional decimal part. Lookarounds keep "x1,2345" from reading as "1,234" and "71432." as a decimal.
_NUMBER = re.compile(r"(?<![0-9])-?[0-9]+(?:,[0-9]{3})*(?![0-9])(?:\.[0-9]+)?")
_DIGITS = re.compile(r"[0-9]+")

# (prefix, suffix) contexts in which a key is encoded for the consistency check: the needle, the
# answer after the question, and the key at the start of a text (no preceding space).
DEFAULT_CONTEXTS: tuple[tuple[str, str], ...] = (
    ("The pass key is ", ". Remember it."),
    ("\nWhat is the pass key? The pass key is ", "."),
    ("", " is the pass key."),
)


def check_key(key: object, name: str = "key") -> str:
    """``key`` if it is a non-empty string of ASCII digits, else ValueError naming the argument."""
    if not isinstance(key, str) or not _DIGITS.fullmatch(key):
        raise ValueError(f"{name} must be a non-empty string of digits 0-9, got {key!r}")
    return key


def first_number(text: str) -> str | None:
    """The first number in ``text`` as written, with thousands commas removed, or None.

    Keeps a minus sign and a decimal part ("-5", "3.25") so that such answers never equal a key; a
    full stop that ends a sentence ("71432.") is not a decimal point.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    m = _NUMBER.search(text)
    return None if m is None else m.group(0).replace(",", "")


def extract_integer(text: str) -> str | None:
    """The digits of the first number in ``text`` when that number is a non-negative integer.

    None when there is no number or the first one is negative or has a decimal part: the answer is
    whatever the model wrote first, and a wrong first number is not rescued by a later right one.
    """
    number = first_number(text)
    return number if number is not None and _DIGITS.fullmatch(number) else None


def exact_match(text: str, key: str, truncated: bool = False) -> bool:
    """Whether the first number in generated ``text`` is exactly ``key`` (a string of digits).

    ``truncated``: the token budget cut the generation. A number running to the very end of such a
    text might have gone on ("71432" of "714321"), so it is not accepted: a short budget must not
    turn a wrong answer into a right one.
    """
    check_key(key)
    m = _NUMBER.search(text)
    if m is None or (truncated and m.end() == len(text)):
        return False
    return m.group(0).replace(",", "") == key


@dataclass(frozen=True)
class NumberTokenization:
    """How a tokenizer encodes ``key`` in each of ``contexts``.

    ``ids[i]`` are the tokens of the key in context i, or None where a token straddles the key's
    boundary (the key merged with its neighbours, so it has no tokens of its own there).
    """

    key: str
    contexts: tuple[tuple[str, str], ...]
    ids: tuple[tuple[int, ...] | None, ...]

    @property
    def clean(self) -> bool:
        """The key has tokens of its own in every context."""
        return all(x is not None for x in self.ids)

    @property
    def consistent(self) -> bool:
        """The key is the same tokens in every context (so position in the text does not matter)."""
        return self.clean and len(set(self.ids)) == 1

    @property
    def per_digit(self) -> bool:
        """Every context encodes the key one token per digit."""
        return self.clean and all(len(x or ()) == len(self.key) for x in self.ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "ids": [None if x is None else list(x) for x in self.ids],
            "clean": self.clean,
            "consistent": self.consistent,
            "per_digit": self.per_digit,
        }


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def key_token_ids(
    tokenizer: Any, key: str, prefix: str = "The pass key is ", suffix: str = "."
) -> tuple[int, ...] | None:
    """Token ids of ``key`` inside ``prefix + key + suffix``, or None if the key shares a token with
    its neighbours.

    Found without offset mappings (so slow tokenizers work too): the ids of the whole text must
    start with the ids of ``prefix`` and end with the ids of ``suffix``; what lies between is the key.
    """
    check_key(key)
    whole = _encode(tokenizer, prefix + key + suffix)
    head = _encode(tokenizer, prefix) if prefix else []
    tail = _encode(tokenizer, suffix) if suffix else []
    if whole[: len(head)] != head or len(whole) < len(head) + len(tail):
        return None
    if tail and whole[len(whole) - len(tail) :] != tail:
        return None
    middle = tuple(whole[len(head) : len(whole) - len(tail)])
    # the middle must spell the key itself, not the key plus a merged space or full stop
    if not middle or tokenizer.decode(list(middle)).strip() != key:
        return None
    return middle


def number_tokenization(
    tokenizer: Any, key: str, contexts: Sequence[tuple[str, str]] = DEFAULT_CONTEXTS
) -> NumberTokenization:
    """Encode ``key`` in each (prefix, suffix) context; see NumberTokenization for the verdicts."""
    check_key(key)
    ctx = tuple((str(p), str(s)) for p, s in contexts)
    if not ctx:
        raise ValueError("contexts must not be empty")
    return NumberTokenization(key, ctx, tuple(key_token_ids(tokenizer, key, p, s) for p, s in ctx))
