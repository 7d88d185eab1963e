"""Passkey prompts sized in tokens: one key at a chosen depth, or several named keys.

``passkey.passkey_prompt`` counts filler *sentences*; a benchmark over context lengths needs the
prompt to be N *tokens* of the model's tokenizer and the needle at a fraction of the filler measured
in tokens, because that is what attention sees. Here the filler is cut at word granularity (about
one token), so the total lands within a token or two of the target, and each needle sits at the
sentence boundary whose token offset is nearest to ``depth`` x filler tokens (at most half a
sentence, ~3 tokens, away). Every count in the returned ``Prompt`` is measured by tokenizing the
final text, never estimated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .passkey import FILLER, INTRO, QUESTION, needle
from .scoring import check_key

LENGTH_TOLERANCE = 0.02  # a prompt's token count must lie within 2% of the target
MAX_FIT_STEPS = 16

MULTI_INTRO = (
    "There are several pass keys hidden inside a lot of irrelevant text, each for a different person. "
    "Find them and memorize them. I will quiz you about one of them.\n"
)
NAMES = (
    "Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jonas",
    "Keiko", "Liam", "Mira", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
)  # fmt: skip

# The repeating filler, one unit per word (each keeps its trailing space); a unit ending in ". "
# closes a sentence, and needles are only placed where a sentence ends.
_UNITS = tuple(w + " " for w in FILLER.split(" ") if w)


def multikey_needle(name: str, key: str) -> str:
    return f"The pass key for {name} is {key}. Remember it. "


def multikey_question(name: str) -> str:
    return f"\nWhat is the pass key for {name}? The pass key for {name} is"


def random_key(rng: random.Random, digits: int = 5) -> str:
    """A key of ``digits`` digits without a leading zero (so it reads as one number in any tokenizer)."""
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive int, got {digits!r}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


@dataclass(frozen=True)
class Needle:
    """One needle of a prompt, with its place measured in tokens of the final text."""

    text: str
    key: str
    name: str | None
    depth: float  # requested fraction of the filler before the needle
    char_start: int
    token_start: int  # index of the needle's first token in the prompt's input ids
    num_tokens: int
    filler_before: int  # filler tokens between the intro and this needle

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "depth": self.depth,
            "token_start": self.token_start,
            "num_tokens": self.num_tokens,
            "filler_before": self.filler_before,
        }


@dataclass(frozen=True)
class Prompt:
    """A sized prompt: its text, the expected answer and where every needle landed."""

    text: str
    answer: str
    query: str | None  # the name asked for (multi-key prompts)
    target_tokens: int
    num_tokens: int  # len(tokenizer(text).input_ids): what the model is given
    head_tokens: int
    filler_tokens: int
    needles: tuple[Needle, ...]

    @property
    def answer_needle(self) -> Needle:
        return next(n for n in self.needles if n.key == self.answer and n.name == self.query)

    def depth_of(self, needle_: Needle) -> float:
        """Filler tokens before ``needle_`` as a fraction of all filler tokens."""
        return needle_.filler_before / self.filler_tokens if self.filler_tokens else 0.0

    @property
    def depth(self) -> float:
        """Measured depth of the needle holding the answer."""
        return self.depth_of(self.answer_needle)


def _count(tokenizer: Any, text: str, special: bool = True) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


class _Filler:
    """Token counts of the repeating filler, per word, measured once per tokenizer and prompt."""

    def __init__(self, tokenizer: Any) -> None:
        # Prefix counts inside a long run of filler (so each word sees real neighbours); a prefix is
        # counted without its trailing space, which BPE tokenizers attach to the next word.
        base = (FILLER * 2).rstrip(" ")
        n0 = _count(tokenizer, base, special=False)
        self.cum = [0]
        for j in range(1, len(_UNITS) + 1):
            text = FILLER * 2 + "".join(_UNITS[:j])
            self.cum.append(_count(tokenizer, text.rstrip(" "), special=False) - n0)
        self.per_cycle = max(1, self.cum[-1])

    def tokens(self, n_units: int) -> int:
        q, r = divmod(n_units, len(_UNITS))
        return q * self.per_cycle + self.cum[r]

    def text(self, start: int, stop: int) -> str:
        return "".join(_UNITS[i % len(_UNITS)] for i in range(start, stop))

    def boundaries(self, n_units: int) -> list[int]:
        """Unit indices where a needle may go: sentence ends within the first ``n_units``, and the end."""
        cuts = [k for k in range(n_units + 1) if k == 0 or _UNITS[(k - 1) % len(_UNITS)].endswith(". ")]
        return cuts if cuts[-1] == n_units else [*cuts, n_units]


def _assemble(
    filler: _Filler, head: str, needles: Sequence[tuple[float, str]], tail: str, n_units: int
) -> tuple[str, list[int], int]:
    """Text with ``n_units`` filler words; returns (text, char start of each needle in input order,
    char start of the tail)."""
    cuts = filler.boundaries(n_units)
    total = filler.tokens(n_units)
    at = [min(cuts, key=lambda k, g=depth * total: (abs(filler.tokens(k) - g), k)) for depth, _ in needles]
    order = sorted(range(len(needles)), key=lambda i: (at[i], needles[i][0], i))
    parts, starts, pos, prev = [head], [0] * len(needles), len(head), 0
    for i in order:
        chunk = filler.text(prev, at[i])
        parts.append(chunk)
        pos += len(chunk)
        starts[i] = pos
        parts.append(needles[i][1])
        pos += len(needles[i][1])
        prev = at[i]
    chunk = filler.text(prev, n_units)
    parts.append(chunk)
    return "".join(parts) + tail, starts, pos + len(chunk)


def _check_target(target_tokens: object) -> int:
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 1:
        raise ValueError(f"target_tokens must be a positive int, got {target_tokens!r}")
    return target_tokens


def _check_depth(depth: object, name: str = "depth") -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {depth!r}")
    return float(depth)


def build_prompt(
    tokenizer: Any,
    target_tokens: int,
    head: str,
    needles: Sequence[tuple[float, str, str, str | None]],
    tail: str,
    answer: str,
    query: str | None = None,
) -> Prompt:
    """A prompt of ``target_tokens`` (+-2%) tokens: ``head``, filler with each needle
    ``(depth, text, key, name)`` at its depth, then ``tail``. ValueError when the fixed parts alone
    are already longer than the target allows."""
    target = _check_target(target_tokens)
    if not needles:
        raise ValueError("needles must not be empty")
    placed = [(_check_depth(d, "needle depth"), text) for d, text, _, _ in needles]
    filler = _Filler(tokenizer)
    words_per_token = len(_UNITS) / filler.per_cycle
    fixed = _count(tokenizer, head + "".join(t for _, t in placed) + tail)
    n = max(0, round((target - fixed) * words_per_token))
    best: tuple[int, int, str, list[int], int] | None = None
    seen: set[int] = set()
    for _ in range(MAX_FIT_STEPS):
        seen.add(n)
        text, starts, tail_start = _assemble(filler, head, placed, tail, n)
        got = _count(tokenizer, text)
        if best is None or abs(got - target) < abs(best[0] - target):
            best = (got, n, text, starts, tail_start)
        if got == target:
            break
        step = round((target - got) * words_per_token) or (1 if got < target else -1)
        n = max(0, n + step)
        if n in seen:
            break
    assert best is not None
    got, n, text, starts, tail_start = best
    if abs(got - target) > LENGTH_TOLERANCE * target:
        raise ValueError(
            f"target_tokens={target} cannot be met within {LENGTH_TOLERANCE:.0%}: the closest prompt has "
            f"{got} tokens (the intro, needles and question alone take {fixed})"
        )
    return _measure(tokenizer, text, starts, tail_start, head, needles, target, got, answer, query)


def _measure(
    tokenizer: Any,
    text: str,
    starts: list[int],
    tail_start: int,
    head: str,
    needles: Sequence[tuple[float, str, str, str | None]],
    target: int,
    num_tokens: int,
    answer: str,
    query: str | None,
) -> Prompt:
    """Token offsets of the needles and the filler size, counted on the final text."""

    def before(char: int) -> int:
        # tokens before this character; the space in front of it belongs to its first token
        return _count(tokenizer, text[:char].rstrip(" "))

    head_tokens = before(len(head))
    spans = []
    for (depth, ntext, key, name), start in zip(needles, starts):
        first = before(start)
        spans.append((depth, ntext, key, name, start, first, before(start + len(ntext)) - first))
    needle_tokens = sum(s[6] for s in spans)
    filler_tokens = before(tail_start) - head_tokens - needle_tokens
    out = []
    for depth, ntext, key, name, start, first, count in spans:
        earlier = sum(s[6] for s in spans if s[4] < start)
        out.append(Needle(ntext, key, name, depth, start, first, count, first - head_tokens - earlier))
    return Prompt(text, answer, query, target, num_tokens, head_tokens, filler_tokens, tuple(out))


def passkey_prompt_tokens(tokenizer: Any, key: str, target_tokens: int, depth: float) -> Prompt:
    """The passkey prompt (``passkey.py``'s intro, needle and question) sized to ``target_tokens``
    tokens of ``tokenizer`` (within 2%), the needle after ``depth`` (0..1) of the filler tokens."""
    check_key(key)
    d = _check_depth(depth)
    return build_prompt(tokenizer, target_tokens, INTRO, [(d, needle(key), key, None)], QUESTION, key)


def multikey_prompt_tokens(
    tokenizer: Any,
    target_tokens: int,
    *,
    num_keys: int = 4,
    seed: int = 0,
    query: int | None = None,
    digits: int = 5,
) -> Prompt:
    """``num_keys`` needles "The pass key for <name> is <number>." spread evenly through the filler
    (depths (i + 0.5) / num_keys, names in random order), asking for the key of needle ``query``
    (default: one drawn by the seed). Names and distinct keys come from ``random.Random(seed)``."""
    if isinstance(num_keys, bool) or not isinstance(num_keys, int) or not 1 <= num_keys <= len(NAMES):
        raise ValueError(f"num_keys must be an int in [1, {len(NAMES)}], got {num_keys!r}")
    if query is not None and (
        isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < num_keys
    ):
        raise ValueError(f"query must be None or an int in [0, {num_keys}), got {query!r}")
    rng = random.Random(seed)
    names = rng.sample(NAMES, num_keys)
    keys: list[str] = []
    while len(keys) < num_keys:
        k = random_key(rng, digits)
        if k not in keys:
            keys.append(k)
    asked = rng.randrange(num_keys) if query is None else query
    needles = [
        ((i + 0.5) / num_keys, multikey_needle(n, k), k, n) for i, (n, k) in enumerate(zip(names, keys))
    ]
    return build_prompt(
        tokenizer,
        target_tokens,
        MULTI_INTRO,
        needles,
        multikey_question(names[asked]),
        keys[asked],
        names[asked],
    )
