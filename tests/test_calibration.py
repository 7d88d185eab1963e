"""The `sparse-attn calibrate METHOD` command line, shared by Loki and MagicPIG: the artifact it
writes fits the model and its sidecar records the exact command and the run."""

from __future__ import annotations

import json

import pytest

import sparse_attn as sa
from sparse_attn.artifact import ModelShape
from tests.hf_models import build

# method -> its config reading the artifact at a path
READERS = {
    "loki": lambda path: sa.Loki(basis=path),
    "magicpig": lambda path: sa.MagicPIG(centres=path),
}


@pytest.mark.parametrize("method", sorted(READERS))
def test_calibrate_cli_records_its_command(method, tmp_path, monkeypatch) -> None:
    from sparse_attn import cli
    from sparse_attn.bench import accuracy

    model = build("llama")

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + ord(c) % 90 for c in text]}

    monkeypatch.setattr(accuracy, "load_model", lambda spec: (model, Tokenizer()))
    data = tmp_path / "text.txt"
    data.write_text("calibration text, " * 20)
    argv = ["calibrate", method, "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "b"),
            "--max-tokens", "300", "--seq-len", "128"]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["sparse-attn", *argv])
    assert cli.main(argv) == 0
    sidecar = json.loads((tmp_path / "b.json").read_text())
    assert sidecar["kind"] == method
    assert sidecar["command"] == "sparse-attn " + " ".join(argv)
    meta = sidecar["meta"]
    assert (meta["tokens"], meta["seq_len"], meta["windows"]) == (300, 128, 3)
    assert meta["data"] == [str(data)] and meta["model"] == "tiny"
    READERS[method](str(tmp_path / "b")).check_model(ModelShape.from_hf_config(model.config))
