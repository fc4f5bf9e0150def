"""CUDA graphs remove the host time of a training step: the op with dropout can be captured (torch.cuda.graph
and torch.compile(mode="reduce-overhead")), and every replay draws a fresh mask from the graph-safe generator
state, computing exactly what an eager call with that seed computes. GPU only."""

import importlib

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear, LoRAQKV

from conftest import requires_cuda

pytestmark = pytest.mark.gpu

op_module = importlib.import_module("lora_fused.ops.lora_linear")


def _module(cls, dtype):
    torch.manual_seed(0)
    if cls == "linear":
        m = LoRALinear(64, 96, r=8, lora_dropout=0.3)
    else:
        m = LoRAQKV(64, 96, r=8, targets="qv", lora_dropout=0.3)
    m = m.to(device="cuda", dtype=dtype).train()
    nn.init.normal_(m.lora_B, std=0.1)
    return m


@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("cls", ["linear", "qkv"])
def test_cuda_graph_replays_draw_fresh_masks_and_match_eager(backend, cls, monkeypatch):
    if backend not in lora_fused.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    m = _module(cls, torch.bfloat16)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(32, 96, device="cuda", dtype=torch.bfloat16)
    seed_seen = torch.zeros(1, dtype=torch.int64, device="cuda")
    draw = op_module.draw_seed

    def recording_draw(t):
        seed = draw(t)
        seed_seen.copy_(seed)  # a device copy, captured with the rest: after a replay it holds that replay's seed
        return seed

    def step():
        y = m(x)
        return (y, *torch.autograd.grad(y, (x, m.lora_A, m.lora_B), g))

    monkeypatch.setattr(op_module, "draw_seed", recording_draw)
    with lora_fused.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy init, Triton autotuning
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
        replays, seeds = [], []
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            replays.append([t.clone() for t in static])
            seeds.append(int(seed_seen.item()))
        assert len(set(seeds)) == 3, seeds  # the generator's offset advances on every replay
        assert not torch.equal(replays[0][0], replays[1][0])
        for seed, outs in zip(seeds, replays):
            monkeypatch.setattr(op_module, "draw_seed", lambda t, s=seed: torch.tensor([s], device=t.device))
            for got, want in zip(outs, step()):
                torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@requires_cuda
def test_compile_reduce_overhead_trains_with_fresh_masks():
    import torch._dynamo.utils

    m = _module("qkv", torch.float32)
    cm = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    outs = []
    torch._dynamo.utils.counters.clear()
    for _ in range(5):
        y = cm(x)
        y.sum().backward()
        outs.append(y.detach().clone())
    assert torch.isfinite(outs[-1]).all()
    assert not torch.equal(outs[-1], outs[-2])  # each replay draws a fresh mask
    inductor = torch._dynamo.utils.counters["inductor"]
    assert not inductor.get("cudagraph_skips"), dict(inductor)  # the step ran as CUDA graphs
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, mode="reduce-overhead")(x), m(x), atol=1e-4, rtol=1e-4)
