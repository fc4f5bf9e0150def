"""The SAM-encoder memory example (benchmarks/train_sam.py) on its tiny stand-in configuration: it runs, writes
its outputs, and its measurements show the design's memory ordering."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("segment_anything")


def test_train_sam_tiny_runs_and_measures(tmp_path):
    from benchmarks import train_sam

    out = tmp_path / "sam"
    rc = train_sam.main(["--tiny", "--steps", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    files = ["train_sam.json", "train_sam.md"] + (["train_sam.png"] if importlib.util.find_spec("matplotlib") else [])
    for name in files:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "train_sam.json").read_text())
    s = data["summary"]
    expected = {"frozen", "seeds", "lora_fused", "lora_fused_fa"} | ({"peft"} if importlib.util.find_spec("peft") else set())
    assert set(s) == expected
    assert all(v["median_step_ms"] > 0 for v in s.values())
    assert s["frozen"]["trainable_params"] == 0
    assert 0 < s["lora_fused_fa"]["trainable_params"] < s["lora_fused"]["trainable_params"]  # A is frozen
    x, h = data["qkv_x_bytes"], data["qkv_h_bytes"]
    assert x > 0 and h > 0
    # lora_fused keeps at most x and h per adapter above the frozen encoder; LoRA-FA no more than that; the
    # hand-written pattern and PEFT keep the dropped copy of x (p = 0.1) on top.
    assert s["lora_fused"]["saved_bytes"] <= s["frozen"]["saved_bytes"] + x + h
    assert s["lora_fused_fa"]["saved_bytes"] <= s["lora_fused"]["saved_bytes"]
    assert s["seeds"]["saved_bytes"] > s["lora_fused"]["saved_bytes"]
    if "peft" in s:
        assert s["peft"]["saved_bytes"] > s["lora_fused"]["saved_bytes"]
    assert [t["target"] for t in data["targets"]][:2] == [
        "LoRA-FA saved <= frozen + 2 MiB", "lora_fused saved <= frozen + bytes(x of every qkv) + bytes(h)"]
    md = (out / "train_sam.md").read_text()
    assert "| lora_fused_fa |" in md and "bytes(x)" in md
