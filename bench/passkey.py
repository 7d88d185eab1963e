"""Passkey retrieval prompts: a number hidden at a chosen depth of repetitive filler text."""

from __future__ import annotations

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_prompt(key: str, num_fillers: int, depth: float) -> str:
    """The prompt with ``num_fillers`` filler sentences and the needle after ``depth`` (0..1) of them."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    if num_fillers < 0:
        raise ValueError(f"num_fillers must be >= 0, got {num_fillers}")
    at = round(depth * num_fillers)
    return INTRO + FILLER * at + needle(key) + FILLER * (num_fillers - at) + QUESTION
