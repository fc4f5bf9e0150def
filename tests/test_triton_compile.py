"""The Triton kernels compile for a real GPU (sm_90, bf16, dropout on), checked on a machine without one.

The interpreter tests check the math; only the GPU compiler sees layouts, tl.dot operand types and shared-memory
budgets. ``lora_fused.kernels.triton.aot_check`` runs Triton's compiler (with its bundled ptxas) down to a cubin.
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Kernel (as the AOT report names it) → the cost model's key for its Philox rounds per mask element.
_ROUNDS_KEY = {"lora_fwd_persistent_kernel": "fwd", "lora_bwd_persistent_kernel": "dx", "lora_down_kernel": "down",
               "lora_bwd_da_kernel": "da", "lora_bwd_dx_kernel": "dx_ptr"}


def _check_rounds_against_cost_model(rows):
    """The cost model prices the keep mask with the Philox rounds per element of the compiled kernels: it must not
    claim fewer than any config the autotuner may pick compiles to."""
    from benchmarks.costmodel import PHILOX_ROUNDS

    seen = set()
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        if cells[0] in _ROUNDS_KEY and cells[9] != "–":
            assert float(cells[9]) <= PHILOX_ROUNDS[_ROUNDS_KEY[cells[0]]] + 1e-9, row
            seen.add(cells[0])
    return seen


def _has_ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _has_ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed here")
def test_static_proof_on_sm90():
    """Every config the autotuner may pick at the headline (M=16384, K=N=4096, r=16) and ViT-B qkv shapes, bf16,
    compiled for sm_90 with the JIT's specialization: the forward and dx kernels are persistent wgmma + TMA GEMMs,
    nothing spills, nothing exceeds the shared-memory limit, and the pruning estimate bounds the real usage."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "lora_fused.kernels.triton.aot_check", "--arch", "90"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-4000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| lora_")]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert {"lora_fwd_persistent_kernel", "lora_bwd_persistent_kernel"} <= kernels
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        if cells[0] in ("lora_fwd_persistent_kernel", "lora_bwd_persistent_kernel"):
            assert int(cells[3]) > 0 and int(cells[4]) > 0 and cells[5] == "yes", row  # wgmma, TMA, persistent
        assert cells[8] == "0" and cells[-1] == "ok", row
    assert {"lora_fwd_persistent_kernel", "lora_bwd_persistent_kernel"} <= _check_rounds_against_cost_model(rows)


@pytest.mark.skipif(not _has_ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed here")
def test_pointer_kernels_compile_for_sm80():
    """The A100 path (no TMA): first configs at the ViT-B shape."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "lora_fused.kernels.triton.aot_check", "--arch", "80", "--shapes", "vit_b_qkv",
         "--first"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-4000:]
    assert "lora_bwd_dx_kernel" in out.stdout and "lora_down_kernel" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| lora_")]
    assert {"lora_down_kernel", "lora_bwd_da_kernel", "lora_bwd_dx_kernel"} <= _check_rounds_against_cost_model(rows)


def test_config_pruning_by_shared_memory():
    """Configs that cannot fit the GPU's shared memory are pruned before compiling; with autotuning off the first
    config that fits is used; every list keeps a config that fits even an sm_86-class GPU (99 KiB) at r = 128."""
    from lora_fused.kernels.triton import (lora_bwd_da, lora_bwd_dh_db, lora_bwd_dx, lora_bwd_persistent, lora_down,
                                           lora_fwd_persistent, lora_linear_fwd)
    from lora_fused.kernels.triton._common import pick_configs

    H100, SM86 = 232448, 101376
    meta = {"BLOCK_R": 128, "HAS_DROPOUT": True, "DO_DA": True}
    down = lora_down.DOWN_CONFIGS_SM90
    fp32 = pick_configs(down, lora_down._smem, H100, 4, meta, full=True)
    assert down[0] not in fp32 and fp32 and all(lora_down._smem({**meta, **c.kwargs, "num_stages": c.num_stages}, 4) <= H100 for c in fp32)
    assert pick_configs(down, lora_down._smem, H100, 2, meta, full=False) == [down[0]]  # bf16: the first fits
    assert len(pick_configs(down, lora_down._smem, H100, 4, meta, full=False)) == 1
    lists = [
        (lora_down.DOWN_CONFIGS_SM90 + lora_down.DOWN_CONFIGS_SM80, lora_down._smem),
        (lora_linear_fwd.GEMM_CONFIGS_SM90 + lora_linear_fwd.GEMM_CONFIGS_SM80, lora_linear_fwd.gemm_smem),
        (lora_bwd_dx.DX_CONFIGS_SM90 + lora_bwd_dx.DX_CONFIGS_SM80, lora_bwd_dx._smem),
        (lora_bwd_da.DA_CONFIGS_SM90 + lora_bwd_da.DA_CONFIGS_SM80, lora_bwd_da._smem),
        (lora_bwd_dh_db.DHDB_CONFIGS_SM90 + lora_bwd_dh_db.DHDB_CONFIGS_SM80, lora_bwd_dh_db._smem),
    ]
    for configs, est in lists:
        last = configs[-1]
        assert est({**meta, **last.kwargs, "num_stages": last.num_stages}, 4) <= SM86, est
    # the persistent TMA kernels run on sm_90+ only (T·r ≤ 128): the forward's last config fits an H100 at fp32,
    # r = 128; the backward's dx tiles fit fp16/bf16 up to T·r = 64, and where none fits (fp32, wider T·r) the
    # backward takes the pointer kernels (bwd_fits says so)
    last = lora_fwd_persistent.FWD_TMA_CONFIGS_SM90[-1]
    assert lora_fwd_persistent.fwd_tma_smem({**meta, **last.kwargs, "num_stages": last.num_stages}, 4) <= H100
    fits = lora_bwd_persistent._fits
    assert fits(2, 16, H100) and fits(2, 64, H100) and not fits(2, 128, H100) and not fits(4, 128, H100)
    assert all(fits(e, br, H100) == any(
        lora_bwd_persistent.bwd_tma_smem({"BLOCK_R": br, **c.kwargs, "num_stages": c.num_stages}, e) <= H100
        for c in lora_bwd_persistent.DX_TMA_CONFIGS_SM90) for e in (2, 4) for br in (16, 32, 64, 128))


def test_backward_takes_the_pointer_kernels_when_no_dx_tile_fits(monkeypatch):
    """With no persistent dx config fitting (as for fp32 on an H100), the backward runs the pointer kernels and
    gives the same gradients."""
    import torch

    from lora_fused.kernels.triton import lora_linear as tl_driver

    gen = torch.Generator().manual_seed(3)
    M, K, N, r = 40, 48, 32, 4
    x, W, A, B = (torch.randn(*s, generator=gen) for s in ((M, K), (N, K), (r, K), (N, r)))
    g = torch.randn(M, N, generator=gen)
    h = x @ A.t()
    args = (g, x, W, A, B, h, 0.5, 0.0, None, [0, N], [True, False, False, True, True])
    want = tl_driver.triton_lora_backward(*args)
    calls = []
    monkeypatch.setattr(tl_driver, "bwd_fits", lambda *a: calls.append(a) or False)
    monkeypatch.setattr(tl_driver, "lora_bwd_persistent", lambda *a, **k: pytest.fail("persistent kernel used"))
    got = tl_driver.triton_lora_backward(*args)
    assert calls
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_autotuner_prune_hook_uses_the_estimate(monkeypatch):
    """The prune hook installed on the autotuner (GPU path) picks by the device limit and the operand dtype."""
    import torch

    from lora_fused.kernels.triton import _common, lora_down

    monkeypatch.setattr(_common, "device_smem_limit", lambda device: 232448)
    x32, x16 = torch.empty(4, 4), torch.empty(4, 4, dtype=torch.float16)
    configs = lora_down.DOWN_CONFIGS_SM90
    for full in (True, False):
        tuner = lora_down._KERNEL._for("sm90", full)
        prune = tuner.early_config_prune
        kw = {"BLOCK_R": 128, "HAS_DROPOUT": True, "DOT_PREC": "tf32"}
        got16 = prune(configs, {"x_ptr": x16, "a_ptr": x16}, **kw)
        got32 = prune(configs, {"x_ptr": x32, "a_ptr": x32}, **kw)
        assert got16[0] is configs[0] and configs[0] not in got32
        if full:
            assert len(got16) > len(got32) >= 1 and set(got16) <= set(configs)
        else:
            assert len(got16) == len(got32) == 1


@pytest.mark.skipif(not _has_ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed here")
def test_direct_launches_pass_what_the_jit_passes():
    """Through a stand-in sm_90 driver (kernels compiled for real, launches recorded): every direct launch of a
    repeated call finds its entry and hands Triton's launcher the JIT's grid, stream, kernel, metadata and
    arguments, for every kernel of the package (persistent and pointer kernels; fp16, bf16, fp32; a 3-D input;
    two targets)."""
    from lora_fused.kernels.triton.launch_check import SCENARIOS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "lora_fused.kernels.triton.launch_check", "--calls", "5"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-4000:]
    lines = out.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| scenario"))
    table = lines[first + 2:lines.index("", first)]  # the launch table: its rows up to the blank line after it
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table]
    assert [row[0] for row in rows] == [s[0] for s in SCENARIOS]
    assert sum(int(row[1]) for row in rows) == 13  # 2 + 2 + 4 + 5 kernels: each scenario's launches all checked
    assert all(int(row[2]) == int(row[1]) for row in rows)
