"""The README's vLLM example runs as written, on the local SmolLM2 checkpoint instead of the hub name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

pytestmark = pytest.mark.slow


def test_readme_vllm_example_runs(smollm2_dir, engine_env, tmp_path) -> None:
    blocks = re.findall(r"```python vllm\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "README.md lost its vLLM example"
    assert HUB_NAME in blocks[0]
    script = tmp_path / "example.py"
    body = blocks[0].replace(HUB_NAME, str(smollm2_dir)).replace("\n", "\n    ")
    # vLLM starts worker processes: the example's code goes under a __main__ guard
    script.write_text(f"def main():\n    {body}\n\nif __name__ == '__main__':\n    main()\n")
    env = {**os.environ, **engine_env}
    env.pop("SPARSE_ATTN_CONFIG", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.strip(), "the example printed no generated text"
