"""Per-position perplexity of a (possibly patched) causal LM over long text.

A sparse pattern that drops distant keys hurts late positions most; one overall perplexity hides
that, so the negative log-likelihood is also reported per position bucket (equal slices of the
window): a flat curve means the pattern kept what the model used, a rising tail means it did not.

The default text is Python's own standard library (a fixed, sorted list of large modules found via
``sysconfig``): present on every machine, no download, long-range structure (names defined far
above their use). Its exact content follows the Python version, which the result records.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Large, long-lived stdlib modules (present as plain .py files from Python 3.10 on), in sorted order.
STDLIB_FILES = (
    "argparse.py",
    "ast.py",
    "dataclasses.py",
    "difflib.py",
    "doctest.py",
    "functools.py",
    "inspect.py",
    "subprocess.py",
    "tarfile.py",
    "threading.py",
    "typing.py",
)
CHARS_PER_TOKEN_GUESS = 2  # generous: code tokenizes at ~3-4 chars per token, so rarely re-tokenized


def stdlib_files() -> list[Path]:
    """The standard-library files of ``STDLIB_FILES`` that this Python has, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in sorted(STDLIB_FILES) if (root / name).is_file()]
    if not files:
        raise FileNotFoundError(f"none of {STDLIB_FILES} found under the standard library at {root}")
    return files


def load_text(text_path: str | Path | None = None) -> tuple[str, str]:
    """(text, source): the file at ``text_path``, or the concatenated standard-library sources."""
    if text_path is not None:
        path = Path(text_path)
        if not path.is_file():
            raise ValueError(f"text_path {str(path)!r} is not a readable file")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    files = stdlib_files()
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return text, "python-stdlib:" + ",".join(f.name for f in files)


def text_token_ids(tokenizer: Any, text: str, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` token ids of ``text`` (1-D long tensor); ValueError if it is shorter.

    Only a prefix of the text is tokenized (the stdlib text is ~1 MB; a window needs a few thousand
    tokens), grown until it yields enough tokens.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 2:
        raise ValueError(f"num_tokens must be an int >= 2, got {num_tokens!r}")
    chars = num_tokens * CHARS_PER_TOKEN_GUESS
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=True)["input_ids"]
        if len(ids) > num_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < num_tokens:
        raise ValueError(f"the text has only {len(ids)} tokens, fewer than the {num_tokens} asked for")
    # more tokens than kept unless the whole text was used: the token cut mid-word is never kept
    return torch.tensor(ids[:num_tokens], dtype=torch.long)


@torch.inference_mode()
def token_nll(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """NLL (nats, float32) of tokens 1..L-1 of a 1-D ``input_ids`` given the tokens before them, from
    one forward pass: entry t is -log p(ids[t + 1] | ids[: t + 1])."""
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise ValueError(f"input_ids must be 1-D with at least 2 tokens, got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    ids = input_ids.to(device)[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[0, 1:], reduction="none").cpu()


def bucket_nll(nll: torch.Tensor, num_buckets: int) -> list[dict[str, Any]]:
    """Mean NLL per position bucket.

    ``nll[t]`` scores the token at position p = t + 1 of a window of L = len(nll) + 1 tokens;
    position p falls in bucket p * num_buckets // L (equal slices of the window; position 0 has no
    prediction). Each row: start and end (positions covered, end exclusive), tokens, nll, ppl.
    """
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}")
    window = nll.numel() + 1
    if num_buckets > window - 1:
        raise ValueError(f"num_buckets={num_buckets} exceeds the {window - 1} scored positions")
    positions = torch.arange(1, window)
    which = positions * num_buckets // window
    rows = []
    for b in range(num_buckets):
        sel = which == b
        part = nll[sel].double()
        mean = float(part.mean())  # never empty: num_buckets <= L - 1 leaves every slice a position
        covered = positions[sel]
        rows.append({
            "start": int(covered[0]), "end": int(covered[-1]) + 1, "tokens": int(part.numel()),
            "nll": mean, "ppl": math.exp(mean),
        })  # fmt: skip
    return rows


def perplexity_by_position(
    model: Any, input_ids: torch.Tensor, window_tokens: int, num_buckets: int = 8
) -> dict[str, Any]:
    """NLL and perplexity of ``model`` over consecutive windows of ``window_tokens`` tokens taken from
    ``input_ids`` (as many whole windows as it holds), overall and per position bucket (averaged
    over the windows, so each bucket compares like positions)."""
    if isinstance(window_tokens, bool) or not isinstance(window_tokens, int) or window_tokens < 2:
        raise ValueError(f"window_tokens must be an int >= 2, got {window_tokens!r}")
    windows = input_ids.numel() // window_tokens
    if windows < 1:
        raise ValueError(
            f"input_ids has {input_ids.numel()} tokens, fewer than window_tokens={window_tokens}"
        )
    nll = torch.stack(
        [token_nll(model, input_ids[w * window_tokens : (w + 1) * window_tokens]) for w in range(windows)]
    ).mean(0)
    overall = float(nll.double().mean())
    return {
        "window_tokens": window_tokens,
        "windows": windows,
        "nll": overall,
        "ppl": math.exp(overall),
        "buckets": bucket_nll(nll, num_buckets),
    }
