"""The README's Python examples run as written (they are the first thing a user copies)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_examples():
    assert BLOCKS, "README.md lost its python examples"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example must not trigger CoverageWarning or deprecations
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
