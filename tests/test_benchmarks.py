"""The benchmark suite (``python -m benchmarks``): argument parsing, result schema, a --quick run, and the
saved-for-backward measurement. Speed is never asserted here: the suite reports it."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import cli, harness, report, suite  # noqa: E402

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


# ----------------------------------------------------------------------------------------------- parsing
def test_parse_shapes_presets_groups_and_custom():
    shapes = harness.parse_shapes("vit_b_qkv,64x32x48,llm_16k")
    assert [s.name for s in shapes] == ["vit_b_qkv", "64x32x48", "llm_16k"]
    assert (shapes[0].M, shapes[0].K, shapes[0].N) == (8 * 197, 768, 2304)
    assert (shapes[1].M, shapes[1].K, shapes[1].N, shapes[1].qkv) == (64, 32, 48, True)
    assert (shapes[2].M, shapes[2].K, shapes[2].N, shapes[2].qkv) == (16384, 4096, 4096, False)
    assert harness.PRESETS["sam_h_qkv"].M == 64 * 64 and harness.PRESETS["sam_h_qkv"].N == 3840
    assert [s.name for s in harness.parse_shapes("cuda")] == ["vit_b_qkv", "sam_h_qkv", "llm_4k", "llm_16k"]
    assert not harness.parse_shapes("10x20x31")[0].qkv
    assert len(harness.parse_shapes("tiny,tiny")) == 1
    for bad in ["nope", "10x20", "0x3x3", ""]:
        with pytest.raises(ValueError):
            harness.parse_shapes(bad)


def test_parse_dtype_and_modes():
    assert harness.parse_dtype("bf16") is torch.bfloat16
    assert harness.parse_dtype("FP32") is torch.float32
    with pytest.raises(ValueError):
        harness.parse_dtype("int8")
    assert suite.parse_modes("fwd,fwd+bwd") == ["fwd", "fwd+bwd"]
    assert suite.parse_modes("train") == ["fwd+bwd"]
    with pytest.raises(ValueError):
        suite.parse_modes("bwd")


def test_cli_defaults_and_options():
    p = cli.build_parser()
    args = p.parse_args([])
    assert args.dropout == [0.0, 0.1] and args.rank == 16 and args.modes == "fwd,fwd+bwd" and not args.quick
    cfg = cli.resolve(p.parse_args(["--device", "cpu"]))
    assert cfg["dtype"] is torch.float32 and [s.name for s in cfg["shapes"]] == ["vit_b_qkv"]
    assert cfg["lora_alpha"] == 32.0 and cfg["ps"] == [0.0, 0.1] and "torch" in cfg["backends"]
    assert any("CPU default shapes" in n for n in cfg["notes"])
    args = p.parse_args(["--device", "cpu", "--dtype", "bf16", "--shapes", "tiny,llm_4k", "--rank", "8",
                         "--dropout", "0.1,0", "--backends", "torch", "--quick", "--out", "/tmp/x",
                         "--modes", "fwd+bwd", "--ops", "qkv"])
    cfg = cli.resolve(args)
    assert cfg["dtype"] is torch.bfloat16 and cfg["r"] == 8 and cfg["ps"] == [0.0, 0.1]
    assert cfg["backends"] == ["torch"] and cfg["out"] == "/tmp/x" and cfg["modes"] == ["fwd+bwd"]
    assert cfg["reps"] == cli.QUICK[0] and cfg["ops"] == ["qkv"]
    assert any("qkv op skipped on llm_4k" in n for n in cfg["notes"])
    with pytest.raises(SystemExit):
        p.parse_args(["--dropout", "1.5"])
    with pytest.raises(SystemExit):
        cli.resolve(p.parse_args(["--device", "cpu", "--ops", "conv"]))
    with pytest.raises(ValueError):
        cli.resolve(p.parse_args(["--device", "cpu", "--backends", "nonexistent"]))


def test_backend_discovery_skips_gpu_only_backends_on_cpu():
    import lora_fused

    names, notes = harness.runnable_backends("cpu", torch.float32)
    assert "torch" in names
    assert set(names) <= set(lora_fused.available_backends())
    assert "cuda" not in names
    assert all("skipped" in n for n in notes)


# ----------------------------------------------------------------------------------------------- memory
def test_saved_bytes_known_cases():
    a = torch.randn(100, 30, requires_grad=True)
    b = torch.randn(100, 30, requires_grad=True)
    # a * b saves both operands: 2 * 100*30*4 bytes.
    assert harness.saved_bytes(lambda: a * b) == 2 * 100 * 30 * 4
    # Views of one storage count once.
    assert harness.saved_bytes(lambda: a[:50] * a[50:]) == 100 * 30 * 4
    # A frozen linear with grad to x only saves nothing but its (excluded) weight.
    lin = torch.nn.Linear(30, 20).requires_grad_(False)
    assert harness.saved_bytes(lambda: lin(a), exclude=list(lin.parameters())) == 0
    assert harness.saved_bytes(lambda: lin(a)) == 20 * 30 * 4  # the weight itself, when not excluded
    # Nothing is saved under no_grad.
    with torch.no_grad():
        assert harness.saved_bytes(lambda: a * b) == 0


def test_saved_bytes_of_lora_fused_is_x_plus_h():
    import lora_fused

    M, K, N, r = 64, 32, 48, 4
    base = torch.nn.Linear(K, N)
    m = lora_fused.LoRALinear.from_linear(base, r=r, lora_dropout=0.1).train()
    x = torch.randn(M, K, requires_grad=True)
    got = harness.saved_bytes(lambda: m(x), exclude=list(m.parameters()))
    shape = harness.Shape("t", M, K, N)
    # x + h; the seed is a Python int here (CPU eager route), on the autograd context rather than saved
    assert got == suite.expected_saved_bytes(shape, torch.float32, r, p=0.1, seed_tensor=False)


def test_summarize_median_and_iqr():
    st = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert st["median_ms"] == 3.0 and st["iqr_ms"] == pytest.approx(2.0) and st["min_ms"] == 1.0 and st["reps"] == 5


# ----------------------------------------------------------------------------------------------- end to end
def test_quick_run_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "res"
    rc = cli.main(["--device", "cpu", "--shapes", "tiny", "--quick", "--reps", "2", "--warmup", "1",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    names = ["results.csv", "results.json", "results.md", "info.txt"]
    if HAVE_MPL:  # the PNGs need matplotlib (the [bench] extra); the suite skips them with a note without it
        names += ["time_ratio.png", "memory.png"]
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "x floor" in printed and "lora_fused[torch]" in printed

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == report.SCHEMA
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == report.SCHEMA and len(data["rows"]) == len(rows)
    assert all(list(r.keys()) == report.SCHEMA for r in data["rows"])
    assert data["meta"]["device"] == "cpu" and data["meta"]["r"] == 16

    with_peft = harness.peft_available() is None
    methods = {(r["op"], r["mode"], r["method"], r["backend"], float(r["p"])) for r in rows}
    for op in ("linear", "qkv"):
        assert (op, "fwd", "floor", "", 0.0) in methods and (op, "fwd+bwd", "floor", "", 0.0) in methods
        for p in (0.0, 0.1):
            assert (op, "fwd+bwd", "plain", "", p) in methods
            assert (op, "fwd+bwd", "lora_fused", "torch", p) in methods
            assert (op, "fwd+bwd", "lora_fused_fa", "torch", p) in methods  # LoRA-FA rows, training only
            assert ((op, "fwd+bwd", "peft", "", p) in methods) == with_peft
        assert (op, "fwd", "lora_fused_fa", "torch", 0.0) not in methods
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["torch"] == torch.__version__
        assert float(r["median_ms"]) > 0 and float(r["iqr_ms"]) >= 0 and int(r["reps"]) == 2
        if r["method"] == "floor":
            assert float(r["ratio_to_floor"]) == 1.0
        if r["mode"] == "fwd+bwd":
            assert r["saved_bytes"] != "" and r["saved_over_x"] != ""
        else:
            assert r["saved_bytes"] == ""
        assert r["peak_bytes"] == ""  # CPU: no peak measurement
        if r["rel_err_vs_plain"]:
            assert float(r["rel_err_vs_plain"]) < 1e-4
    # Memory at p=0.1: ours keeps x and h only; the dropped copy PEFT / plain keep makes theirs larger.
    lin = {(r["method"], float(r["p"])): r for r in rows if r["op"] == "linear" and r["mode"] == "fwd+bwd"}
    shape = harness.PRESETS["tiny"]
    assert int(lin[("lora_fused", 0.1)]["saved_bytes"]) == suite.expected_saved_bytes(shape, torch.float32, 16, p=0.1,
                                                                                      seed_tensor=False)
    assert int(lin[("plain", 0.1)]["saved_bytes"]) > int(lin[("lora_fused", 0.1)]["saved_bytes"])
    assert int(lin[("lora_fused_fa", 0.1)]["saved_bytes"]) <= int(lin[("lora_fused", 0.1)]["saved_bytes"])
    md = (out / "results.md").read_text()
    assert "### linear · tiny" in md and "### qkv · tiny" in md and "| method |" in md


def test_a_failing_method_is_reported_not_fatal():
    rows = suite.run_case(
        "linear", harness.PRESETS["tiny"], device="cpu", dtype=torch.float32, r=4, lora_alpha=8, ps=[0.1],
        modes=["fwd+bwd"], backends=["torch", "no-such-backend"], with_peft=False, reps=1, warmup=0,
    )
    bad = [r for r in rows if r["backend"] == "no-such-backend" and r["method"] == "lora_fused"]
    good = [r for r in rows if r["backend"] == "torch" and r["method"] == "lora_fused"]
    assert len(bad) == 1 and bad[0]["median_ms"] is None and bad[0]["note"].startswith("failed:")
    assert len(good) == 1 and good[0]["median_ms"] > 0
    assert any("failed" in line for line in report.headline(rows))


def test_per_op_scripts_fix_their_op():
    from benchmarks import bench_lora_linear, bench_lora_qkv

    assert bench_lora_linear.OP == "linear" and bench_lora_qkv.OP == "qkv"
    with pytest.raises(SystemExit):
        bench_lora_qkv.main(["--ops", "linear"])


def test_train_vit_runs_and_curves_agree_at_p0(tmp_path):
    """The training example on a tiny mini ViT: PEFT (split q/v) and lora_fused (LoRAQKV qv) are the same
    function at p=0, so their losses agree to float rounding; outputs are written."""
    pytest.importorskip("peft")
    from benchmarks import train_vit

    out = tmp_path / "train"
    rc = train_vit.main(["--device", "cpu", "--model", "mini", "--image-size", "32", "--batch", "2", "--steps", "3",
                         "--rank", "4", "--out", str(out)])
    assert rc == 0
    for name in ("train_vit.json", "train_vit.md") + (("train_vit.png",) if HAVE_MPL else ()):
        assert (out / name).is_file()
    data = json.loads((out / "train_vit.json").read_text())
    assert data["max_abs_loss_diff"] < 1e-4
    assert len(data["losses"]["lora_fused"]) == len(data["losses"]["peft"]) == 3
    s = data["summary"]
    assert s["lora_fused"]["trainable_params"] == s["peft"]["trainable_params"]
    assert s["lora_fused"]["saved_bytes"] > 0 and s["lora_fused"]["peak_bytes"] is None
