"""The suite's lora_fused methods: LoRA-FA rows built with the real API (``lora_fa=True``) and the named-adapter
rows (``lora_fused_2adapters``: a second, inactive adapter held by the module), in time and saved bytes."""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness, suite
from benchmarks.methods import OPS, make_base


@pytest.mark.parametrize("op", ["linear", "qkv"])
def test_fused_methods_are_built_with_the_real_api(op):
    builder, _ = OPS[op]
    base = make_base(24, 36, "cpu", torch.float32, 0)
    methods = {m.label: m for m in builder(base, 4, 8.0, [0.1], ["torch"], False)}
    fused, fa, two = (methods[f"{k}[torch] p=0.1"] for k in ("lora_fused", "lora_fused_fa", "lora_fused_2adapters"))
    assert not fused.module.lora_fa and fa.module.lora_fa and fa.module.spec.lora_fa
    assert fa.trainable == [fa.module.lora_B]
    assert two.module.adapter_names == ["default", "other"] and two.module.active_adapter == "default"
    other = two.module.lora_adapters["other"]
    assert other.spec.r == 2 and not other.lora_A.requires_grad and not other.lora_B.requires_grad
    assert len(two.trainable) == 2 and all(t.requires_grad for t in two.trainable)
    # the same function as lora_fused: the inactive adapter takes no part
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(two.module.eval()(x), fused.module.eval()(x))
        torch.testing.assert_close(fa.module.eval()(x), fused.module.eval()(x))
    assert not builder(base, 4, 8.0, [0.0], ["torch"], False, lora_fa=False, two_adapters=False)[-1].method.endswith(
        ("_fa", "_2adapters"))


def test_two_adapter_rows_in_both_modes_save_what_one_adapter_saves():
    rows = suite.run_case(
        "qkv", harness.PRESETS["tiny"], device="cpu", dtype=torch.float32, r=4, lora_alpha=8, ps=[0.0, 0.1],
        modes=["fwd", "fwd+bwd"], backends=["torch"], with_peft=False, reps=1, warmup=0,
    )
    by = {(r["mode"], r["method"], r["p"]): r for r in rows}
    assert ("fwd", "lora_fused_2adapters", 0.0) in by and ("fwd", "lora_fused_fa", 0.0) not in by
    for p in (0.0, 0.1):
        one, two = by[("fwd+bwd", "lora_fused", p)], by[("fwd+bwd", "lora_fused_2adapters", p)]
        assert two["median_ms"] > 0 and two["saved_bytes"] == one["saved_bytes"]
        assert by[("fwd+bwd", "lora_fused_fa", p)]["saved_bytes"] < one["saved_bytes"]
    assert by[("fwd", "lora_fused_2adapters", 0.0)]["rel_err_vs_plain"] < 1e-5
