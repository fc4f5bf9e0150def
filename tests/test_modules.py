"""LoRALinear / LoRAQKV: the public module contract (construction, from_linear, forward, merge, qkv targets and splits)."""

import itertools
import math
import os

import pytest
import torch
import torch.nn as nn

from lora_fused import LoRALinear, LoRAQKV

from conftest import naive_lora


def _randomize(m):
    with torch.no_grad():
        m.lora_B.normal_()
        if m.bias is not None:
            m.bias.normal_()
    return m


def test_lora_linear_is_a_frozen_nn_linear_with_peft_init():
    torch.manual_seed(0)
    m = LoRALinear(37, 100, r=4, lora_alpha=16, lora_dropout=0.1)
    assert isinstance(m, nn.Linear)
    assert (m.in_features, m.out_features, m.r, m.lora_alpha, m.lora_dropout) == (37, 100, 4, 16, 0.1)
    assert m.scaling == 4.0 and m.merged is False and m.use_rslora is False
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    assert m.lora_A.shape == (4, 37) and m.lora_B.shape == (100, 4)
    assert torch.count_nonzero(m.lora_B) == 0
    bound = 1 / math.sqrt(37)  # kaiming_uniform(a=sqrt(5)) on (r, in) gives U(-1/sqrt(in), 1/sqrt(in))
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.5 * bound
    x = torch.randn(3, 37)
    torch.testing.assert_close(m(x), nn.functional.linear(x, m.weight, m.bias))  # fresh module == base
    assert "r=4" in repr(m) and "lora_alpha=16" in repr(m) and "lora_dropout=0.1" in repr(m)


def test_rslora_scaling_and_reset():
    m = LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True)
    assert m.scaling == pytest.approx(8 / 4)
    _randomize(m)
    old_A = m.lora_A.detach().clone()
    m.reset_lora_parameters()
    assert torch.count_nonzero(m.lora_B) == 0 and not torch.equal(old_A, m.lora_A)


def test_from_linear_shares_weight_and_follows_dtype():
    base = nn.Linear(24, 12, dtype=torch.float64)
    m = LoRALinear.from_linear(base, r=2, lora_alpha=4)
    assert m.weight is base.weight and m.bias is base.bias
    assert not base.weight.requires_grad
    assert m.lora_A.dtype == torch.float64 and m.lora_A.device == base.weight.device
    x = torch.randn(5, 24, dtype=torch.float64)
    _randomize(m)
    torch.testing.assert_close(m(x), naive_lora(x, base.weight, base.bias, m.lora_A, m.lora_B, 2.0))
    nobias = LoRALinear.from_linear(nn.Linear(4, 3, bias=False))
    assert nobias.bias is None and nobias(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("cls_kwargs", [(LoRALinear, {}), (LoRAQKV, {"targets": "qv", "splits": (8, 4, 4)})])
def test_merge_unmerge_to_linear(cls_kwargs):
    cls, kw = cls_kwargs
    torch.manual_seed(1)
    m = _randomize(cls(16, 16, r=4, lora_alpha=8, **kw)).eval()
    x = torch.randn(6, 16)
    y = m(x)
    w0 = m.weight.detach().clone()
    lin = m.to_linear()
    assert type(lin) is nn.Linear and lin.weight is not m.weight and torch.equal(m.weight, w0)
    torch.testing.assert_close(lin(x), y)
    m.merge()
    assert m.merged and "merged=True" in repr(m)
    torch.testing.assert_close(m(x), y)
    torch.testing.assert_close(m.to_linear()(x), y)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    torch.testing.assert_close(m.weight, w0)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()
    torch.testing.assert_close(m(x), y)


def test_merge_is_float32_math_for_bf16():
    torch.manual_seed(2)
    m = _randomize(LoRALinear(64, 64, r=8, dtype=torch.bfloat16))
    expected = (m.weight.float() + m.scaling * m.lora_B.float() @ m.lora_A.float()).bfloat16()
    m.merge()
    assert torch.equal(m.weight, expected)


TARGET_SUBSETS = ["".join(c) for n in (1, 2, 3) for c in itertools.combinations("qkv", n)]


@pytest.mark.parametrize("targets", TARGET_SUBSETS)
@pytest.mark.parametrize("splits", [None, (16, 8, 8)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_qkv_equals_base_plus_per_slice_adapters(targets, splits, p):
    torch.manual_seed(4)
    m = _randomize(LoRAQKV(20, 32 if splits else 30, r=3, lora_alpha=6, lora_dropout=p, targets=targets, splits=splits))
    sp = m.splits
    assert m.targets == tuple(targets)
    assert m.lora_A.shape == (3 * len(targets), 20)
    x = torch.randn(2, 5, 20, dtype=torch.float32)
    if p:
        from lora_fused.kernels.reference import dropout_keep_mask
        torch.manual_seed(11)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        keep = dropout_keep_mask(seed, 10, 20, p, x.device).view(2, 5, 20)
        torch.manual_seed(11)
    else:
        keep = None
    y = m(x)
    xd = x if keep is None else x * keep / (1 - p)
    expected = nn.functional.linear(x, m.weight, m.bias)
    offs = {"q": 0, "k": sp[0], "v": sp[0] + sp[1]}
    for t in "qkv":
        cols = slice(offs[t], offs[t] + dict(zip("qkv", sp))[t])
        if t in targets:
            expected[..., cols] += m.scaling * (xd @ m.lora_A_for(t).t()) @ m.lora_B_for(t).t()
    torch.testing.assert_close(y, expected)
    q, k, v = m.forward_split(x)
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == sp


def test_qkv_adapter_views_write_through_and_untargeted_raises():
    m = LoRAQKV(8, 24, r=2, targets=["v", "q"])
    assert m.targets == ("q", "v")
    with torch.no_grad():
        m.lora_B_for("v").fill_(3.0)
        m.lora_A_for("q").zero_()
    assert torch.all(m.lora_B[8:] == 3.0) and torch.all(m.lora_B[:8] == 0)
    assert torch.count_nonzero(m.lora_A[:2]) == 0
    assert m.lora_B_for("v").shape == (8, 2) and m.lora_A_for("v").shape == (2, 8)
    with pytest.raises(KeyError, match="'k'"):
        m.lora_A_for("k")
    assert "targets='qv'" in repr(m) and "splits=(8, 8, 8)" in repr(m)


def test_qkv_single_gemm_for_down_projections():
    """All targeted A's are one packed Parameter, so the down projection is one GEMM."""
    m = LoRAQKV(8, 24, r=2, targets="qkv")
    names = [n for n, _ in m.named_parameters()]
    assert names == ["weight", "bias", "lora_adapters.default.lora_A", "lora_adapters.default.lora_B"]
    assert m.lora_A is m.lora_adapters["default"].lora_A


def test_qkv_from_linear_gqa():
    base = nn.Linear(16, 32)
    m = LoRAQKV.from_linear(base, targets="qv", splits=(16, 8, 8), r=2)
    assert m.weight is base.weight and m.splits == (16, 8, 8) and m.lora_B.shape == (24, 2)
    _randomize(m)
    x = torch.randn(4, 16)
    q, k, v = m.forward_split(x)
    base_k = nn.functional.linear(x, base.weight, base.bias)[:, 16:24]
    torch.testing.assert_close(k, base_k)  # untargeted slice is the plain base


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "r must be"),
        ({"r": 2.5}, "r must be"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(4, 4, **kwargs)
    with pytest.raises(ValueError, match=match):
        LoRAQKV(4, 6, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"targets": ""}, "at least one"),
        ({"targets": []}, "at least one"),
        ({"targets": "qx"}, "unknown qkv target"),
        ({"targets": "qq"}, "repeat"),
        ({"splits": (4, 4, 4)}, "sum to 12, not out_features=24"),
        ({"splits": (12, 12)}, "three positive"),
    ],
)
def test_bad_qkv_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAQKV(8, 24, **kwargs)


def test_qkv_needs_splits_when_not_divisible_by_three():
    with pytest.raises(ValueError, match="not divisible by 3"):
        LoRAQKV(8, 25)


def test_bad_inputs_name_the_problem():
    m = LoRALinear(37, 10, r=2)
    with pytest.raises(ValueError, match=r"in_features=37"):
        m(torch.randn(3, 36))
    with pytest.raises(RuntimeError, match=r"expected \(\.\.\., 37\)"):
        m(torch.randn(3, 36))
    with pytest.raises(TypeError, match="float64.*float32"):
        m(torch.randn(3, 37, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="cast the input"):
        m(torch.randn(3, 37, dtype=torch.float16))
    with pytest.raises(TypeError, match="expected a Tensor"):
        m([1.0] * 37)
    q = LoRAQKV(8, 24, r=2, targets="qv")
    with pytest.raises(ValueError, match=r"LoRAQKV\(in_features=8"):
        q(torch.randn(2, 9))


def test_float32_adapters_on_bf16_base_train():
    m = LoRALinear(16, 8, r=2, dtype=torch.bfloat16)
    m.lora_A.data = m.lora_A.data.float()
    m.lora_B.data = m.lora_B.data.float()
    y = m(torch.randn(4, 16, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and m.lora_A.grad.dtype == torch.float32


def test_autocast_follows_nn_linear():
    m = LoRALinear(16, 8, r=2)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yl = m(x), lin(x)
    assert y.dtype == yl.dtype == torch.bfloat16


# -- adapter_dtype: float32 adapters on a half-precision base, every backend that runs here -----------------------------
def _half_backends():
    import lora_fused

    out = [("torch", torch.bfloat16), ("torch", torch.float16)]
    if "triton" in lora_fused.available_backends() or os.environ.get("TRITON_INTERPRET") == "1":
        out.append(("triton", torch.float16))  # the Triton interpreter computes fp16 dots right (bf16 only on a GPU)
    return out


@pytest.mark.parametrize("backend,dtype", _half_backends())
@pytest.mark.parametrize("cls_kwargs", [(LoRALinear, {}), (LoRAQKV, {"targets": "qv", "splits": (16, 8, 8)})])
def test_float32_adapters_on_half_base_grads_exact(backend, dtype, cls_kwargs):
    """``adapter_dtype=float32``: the parameters stay float32, the op computes in the base's dtype, and the
    gradients that reach the float32 parameters equal float64 math (of the cast adapters) within the base dtype's
    tolerance."""
    import lora_fused
    from conftest import assert_close_dtype

    cls, kw = cls_kwargs
    torch.manual_seed(3)
    m = cls(24, 32, r=4, lora_alpha=8, dtype=dtype, adapter_dtype=torch.float32, **kw)
    assert m.weight.dtype == dtype and m.lora_A.dtype == torch.float32 and m.lora_B.dtype == torch.float32
    with torch.no_grad():
        m.lora_B.normal_(std=0.5)
    x = torch.randn(5, 24, dtype=dtype)
    g = torch.randn(5, 32, dtype=dtype)
    with lora_fused.use_backend(backend):
        y = m(x)
        (y.float() * g.float()).sum().backward()
    assert y.dtype == dtype and m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.dtype == torch.float32
    A64 = m.lora_A.detach().to(dtype).double().requires_grad_(True)
    B64 = m.lora_B.detach().to(dtype).double().requires_grad_(True)
    ref = naive_lora(x.double(), m.weight.double(), m.bias.double(), A64, B64, m.scaling, lora_slices=m.lora_slices())
    (ref * g.double()).sum().backward()
    assert_close_dtype(y, ref, dtype)
    assert_close_dtype(m.lora_A.grad, A64.grad, dtype, "grad")
    assert_close_dtype(m.lora_B.grad, B64.grad, dtype, "grad")


def test_adapter_dtype_through_inject_and_checkpoint(tmp_path):
    import lora_fused as lf

    model = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 8)).to(torch.bfloat16)
    lf.inject_lora(model, ["0", "2"], adapter_dtype=torch.float32, r=2)
    assert model[0].lora_A.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16
    model(torch.randn(3, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert model[0].lora_B.grad.dtype == torch.float32
    lf.save_lora(model, tmp_path / "a.safetensors")
    fresh = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 8)).to(torch.bfloat16)
    lf.load_lora(fresh, tmp_path / "a.safetensors")
    assert fresh[2].lora_B.dtype == torch.float32 and torch.equal(fresh[2].lora_A, model[2].lora_A)


# -- named adapters on one module -------------------------------------------------------------------------------------
def test_module_level_named_adapters():
    m = LoRAQKV(8, 24, r=2, targets="qv")
    m.add_adapter("full", r=3, lora_alpha=6, targets="qkv")
    assert m.adapter_names == ["default", "full"] and m.active_adapter == "default"
    assert not m.lora_adapters["full"].lora_A.requires_grad  # inactive: frozen
    m.set_adapter("full")
    assert m.r == 3 and m.targets == ("q", "k", "v") and m.lora_A.requires_grad
    assert not m.lora_adapters["default"].lora_B.requires_grad
    x = torch.randn(2, 8)
    _randomize(m)
    expected = naive_lora(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling, lora_slices=m.lora_slices())
    torch.testing.assert_close(m(x), expected)
    m.delete_adapter("default")
    assert m.adapter_names == ["full"]
    with pytest.raises(ValueError, match="already has an adapter named 'full'"):
        m.add_adapter("full")
    other_splits = m.lora_adapters["full"].spec.with_(splits=(12, 6, 6))
    with pytest.raises(ValueError, match=r"has splits \(8, 8, 8\)"):
        m.attach_adapter("g", lf_adapter(other_splits))
    m.active_adapter = "missing"
    assert not hasattr(m, "lora_A")
    torch.testing.assert_close(m(x), nn.functional.linear(x, m.weight, m.bias))  # no active adapter: the base


def lf_adapter(spec):
    from lora_fused import LoRAAdapter

    return LoRAAdapter(spec)


def test_old_single_adapter_state_dict_loads():
    """A full state dict of a module saved before named adapters (keys lora_A / lora_B) loads into the active one."""
    src = LoRAQKV(8, 24, r=2, targets="qv")
    _randomize(src)
    old = {"weight": src.weight, "bias": src.bias, "lora_A": src.lora_A.detach(), "lora_B": src.lora_B.detach()}
    dst = LoRAQKV(8, 24, r=2, targets="qv")
    dst.load_state_dict(old)
    assert torch.equal(dst.lora_B, src.lora_B) and torch.equal(dst.weight, src.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_adapters_on_half_base_cuda(backend, dtype):
    """adapter_dtype=float32 on a CUDA half-precision base, each GPU backend (skipped where one cannot run)."""
    import lora_fused
    from conftest import assert_close_dtype

    if backend not in lora_fused.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    torch.manual_seed(3)
    m = LoRAQKV(64, 96, r=8, targets="qv", dtype=dtype, device="cuda", adapter_dtype=torch.float32)
    with torch.no_grad():
        m.lora_B.normal_(std=0.5)
    x = torch.randn(33, 64, dtype=dtype, device="cuda")
    with lora_fused.use_backend(backend):
        y = m(x)
        y.float().square().sum().backward()
    A64 = m.lora_A.detach().to(dtype).double().requires_grad_(True)
    B64 = m.lora_B.detach().to(dtype).double().requires_grad_(True)
    ref = naive_lora(x.double(), m.weight.double(), m.bias.double(), A64, B64, m.scaling, lora_slices=m.lora_slices())
    ref.square().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32
    assert_close_dtype(y, ref, dtype)
    assert_close_dtype(m.lora_A.grad, A64.grad, dtype, "grad")
    assert_close_dtype(m.lora_B.grad, B64.grad, dtype, "grad")


def test_assigning_lora_a_replaces_the_active_adapter_parameter():
    m = LoRALinear(8, 4, r=2)
    new = nn.Parameter(torch.ones(2, 8))
    m.lora_A = new
    assert m.lora_A is new and m.lora_adapters["default"].lora_A is new
    with pytest.raises(ValueError, match=r"has shape \(4, 2\)"):
        m.lora_B = nn.Parameter(torch.ones(3, 2))
    with pytest.raises(TypeError, match="nn.Parameter"):
        m.lora_B = torch.ones(4, 2)
