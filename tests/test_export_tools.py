"""What the ecosystem's tools see of the op: ONNX export (unmerged and merged) checked with onnxruntime,
torch.export keeping the registered op, the meta device, and FlopCounterMode's counts."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear, LoRAQKV


class _Net(nn.Module):
    """A LoRAQKV and a LoRALinear, as in an attention block."""

    def __init__(self, p=0.1):
        super().__init__()
        self.qkv = LoRAQKV(16, 48, r=4, targets="qv", lora_dropout=p)
        self.proj = LoRALinear(48, 8, r=2, lora_dropout=p)

    def forward(self, x):
        return self.proj(torch.relu(self.qkv(x)))


def _net():
    torch.manual_seed(0)
    net = _Net()
    for prm in net.parameters():
        if prm.requires_grad:
            nn.init.normal_(prm, std=0.3)
    return net.eval()


def _onnx_run(path, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_onnx_export_matches_onnxruntime(tmp_path, dynamo, merged):
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    net = _net()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = net(x)
    if merged:
        lora_fused.merge_lora(net)
    path = tmp_path / "model.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=dynamo)
    import onnx

    graph_ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not any("lora" in op.lower() for op in graph_ops), graph_ops  # standard operators only
    torch.testing.assert_close(_onnx_run(path, x), expected, atol=1e-4, rtol=1e-4)


def test_onnx_export_with_active_dropout_says_to_merge_or_eval(tmp_path):
    pytest.importorskip("onnxscript")
    net = _net().train()
    with pytest.raises(Exception, match="merge_lora") as info:
        torch.onnx.export(net, (torch.randn(2, 16),), str(tmp_path / "m.onnx"), dynamo=True)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(type(exc).__name__)
        exc = exc.__cause__
    assert "LoRAExportError" in chain


def test_torch_export_keeps_the_registered_op():
    net = _net()
    x = torch.randn(2, 5, 16)
    ep = torch.export.export(net, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lora_fused.lora_linear.default" in targets
    torch.testing.assert_close(ep.module()(x), net(x))


# ----------------------------------------------------------------------------------------------- meta
@pytest.mark.parametrize("cls", ["linear", "qkv"])
@pytest.mark.parametrize("training", [False, True])
def test_meta_device_forward_and_backward_like_nn_linear(cls, training):
    with torch.device("meta"):
        if cls == "linear":
            m = LoRALinear(16, 24, r=2, lora_dropout=0.1)
        else:
            m = LoRAQKV(16, 24, r=2, targets="qv", lora_dropout=0.1)
        ref = nn.Linear(16, 24)
    m.train(training)
    x = torch.randn(3, 5, 16, device="meta", requires_grad=True)
    y = m(x)
    assert y.device.type == "meta" and y.shape == ref(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape and m.lora_A.grad.shape == m.lora_A.shape and m.lora_B.grad.device.type == "meta"
    m.to_empty(device="cpu")  # the usual meta-init route: materialize, then load or initialize
    assert m.weight.device.type == "cpu"


# ----------------------------------------------------------------------------------------------- FLOPs
def _flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("cls", ["linear", "qkv"])
def test_flop_counter_counts_forward_and_backward(cls):
    M, K, N, r = 10, 32, 48, 4
    m = LoRALinear(K, N, r=r) if cls == "linear" else LoRAQKV(K, N, r=r, targets="qv")
    T, n_lora = (1, N) if cls == "linear" else (2, 2 * N // 3)
    x = torch.randn(M, K)
    fwd = 2 * M * K * N + 2 * M * K * T * r + 2 * M * r * n_lora
    assert _flops(lambda: m(x)) == fwd
    base = nn.Linear(K, N)
    assert _flops(lambda: m(x)) > _flops(lambda: base(x))
    # backward with dx, dA, dB: u = gB, dB, dA, dx (uA and gW)
    xg = x.clone().requires_grad_(True)
    bwd = 2 * M * n_lora * r * 2 + 2 * M * T * r * K * 2 + 2 * M * N * K
    assert _flops(lambda: m(xg).sum().backward()) == fwd + bwd
    m.lora_A.requires_grad_(False)
    bwd_frozen_a = 2 * M * n_lora * r * 2 + 2 * M * T * r * K + 2 * M * N * K
    assert _flops(lambda: m(xg).sum().backward()) == fwd + bwd_frozen_a


def test_flop_formulas_registered_when_flop_counter_is_imported_after_lora_fused():
    """``import lora_fused`` does not import torch.utils.flop_counter (it imports Triton); the formulas are
    registered when it is imported later."""
    code = (
        "import sys, torch, lora_fused\n"
        "assert 'torch.utils.flop_counter' not in sys.modules\n"
        "from torch.utils.flop_counter import FlopCounterMode, flop_registry\n"
        "assert torch.ops.lora_fused.lora_linear in flop_registry\n"
        "assert torch.ops.lora_fused.lora_linear_backward in flop_registry\n"
        "m = lora_fused.LoRALinear(8, 6, r=2)\n"
        "with FlopCounterMode(display=False) as c: m(torch.randn(3, 8))\n"
        "print(c.get_total_flops())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == 2 * 3 * 8 * 6 + 2 * 3 * 8 * 2 + 2 * 3 * 2 * 6


def test_flop_formula_module_math():
    from lora_fused.ops.flops import lora_linear_backward_flops, lora_linear_flops

    assert lora_linear_flops((2, 3, 8), (6, 8), (6,), (4, 8), (6, 2)) == 2 * 6 * (8 * 6 + 8 * 4 + 2 * 6)
    assert lora_linear_backward_flops((6, 6), None, (6, 8), (2, 8), (6, 2), None, None, 1.0, 0.0, [0, 6], "torch",
                                      [False, True, True, False, False]) == 2 * 6 * 6 * 8
    assert math.prod(()) == 1  # a 1-D input counts one row
