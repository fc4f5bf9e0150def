"""The host-overhead table of the benchmark suite: its rows, its markdown, and its place in a suite run.
Speed is reported by the suite, never asserted here."""

from __future__ import annotations

import csv
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import cli, harness, host_overhead, report  # noqa: E402


def test_rows_cover_every_method_mode_and_p():
    with_peft = harness.peft_available() is None
    threads = torch.get_num_threads()
    rows = host_overhead.run_host_overhead(backends=["torch"], with_peft=with_peft, rounds=2, calls=3)
    assert torch.get_num_threads() == threads  # the one-thread setting is restored
    keys = {(r["op"], r["mode"], r["method"], r["backend"], r["p"]) for r in rows}
    for op in ("linear", "qkv"):
        for mode in ("fwd", "fwd+bwd"):
            assert (op, mode, "floor", "", 0.0) in keys
            for p in host_overhead.PS:
                assert (op, mode, "lora_fused", "torch", p) in keys
                assert (op, mode, "plain", "", p) in keys
                assert ((op, mode, "peft", "", p) in keys) == with_peft
    for r in rows:
        assert r["shape"] == host_overhead.SHAPE_NAME and r["median_ms"] > 0 and r["reps"] == 2 * 3
        assert set(r) <= set(report.CASE_COLUMNS)
        assert (r["M"], r["K"], r["N"]) == ((8, 16, 16) if r["op"] == "linear" else (8, 16, 48))
    md = "\n".join(host_overhead.markdown(rows))
    assert "Host overhead" in md and "| linear | lora_fused[torch] | 0.1 |" in md and "eval fwd µs" in md


def test_suite_writes_the_host_table(tmp_path):
    out = tmp_path / "res"
    rc = cli.main(["--device", "cpu", "--shapes", "tiny", "--ops", "linear", "--modes", "fwd", "--quick",
                   "--reps", "1", "--warmup", "0", "--no-peft", "--no-plots", "--no-progress", "--host-overhead",
                   "--out", str(out)])
    assert rc == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    host = [r for r in rows if r["shape"] == host_overhead.SHAPE_NAME]
    assert host and {r["mode"] for r in host} == {"fwd", "fwd+bwd"}
    md = (out / "results.md").read_text()
    assert "### Host overhead" in md and "### linear · tiny" in md
    assert "host_tiny" not in md.split("### Host overhead")[0]  # the regular tables leave the host rows out


def test_quick_runs_leave_the_host_table_out_unless_asked():
    p = cli.build_parser()
    assert cli.resolve(p.parse_args(["--device", "cpu", "--quick"]))["host_overhead"] is False
    assert cli.resolve(p.parse_args(["--device", "cpu"]))["host_overhead"] is True
    assert cli.resolve(p.parse_args(["--device", "cpu", "--no-host-overhead"]))["host_overhead"] is False
