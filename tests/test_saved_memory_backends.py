"""Save only what the needed gradients require, on every backend that runs here (the torch backend, the Triton
backend: under the interpreter on CPU, compiled on a GPU; the CUDA backend on a GPU), fp32 and fp16.

For each combination of A / B frozen or trainable, x requiring grad or not, a trainable base weight, p = 0 and
p > 0, on ``LoRALinear`` and ``LoRAQKV``: the bytes autograd saves are asserted exactly (x only for dA or dW, h
only for dB, the seed only for the mask of dx or dA: an 8-byte tensor, or a Python int on the autograd context on
the torch backend's CPU eager route), and every gradient that is computed matches float64
math built from the backend's own dropout mask, through the eager route and the registered op. Then LoRA-FA at module level (the module keyword and
``inject_lora(..., lora_fa=True)``): nothing saved but ``h`` and seeds, no LoRA input among the saved tensors,
and every gradient against float64 math through the whole model.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

import lora_fused as lf
from lora_fused import LoRALinear, LoRAQKV, use_backend
from lora_fused.backends import get_backend_impl, unavailable_reason
from lora_fused.kernels.reference import dropout_keep_mask
from lora_fused.kernels.reference.dropout import hashed_keep_mask
from lora_fused.ops.lora_linear import draw_seed

from conftest import assert_close_dtype, naive_lora

M_SHAPE, K, R = (3, 7), 24, 4  # x is (3, 7, 24): M = 21 rows
M = 21
SEED = 7


DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
N_LINEAR, N_QKV = 24, 48  # multiples of 8: the CUDA kernels need 16-byte rows


def _cases():
    """(backend, device, dtype) triples whose backend takes this file's shapes there (the CUDA backend takes
    fp16/bf16 only; the Triton backend takes CPU tensors under the interpreter only)."""
    out = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name in ("torch", "triton", "cuda"):
            if unavailable_reason(name) is not None:
                continue
            for label, dtype in DTYPES.items():
                def t(*shape):
                    return torch.zeros(shape, device=device, dtype=dtype)

                probes = [(t(M, K), t(N_LINEAR, K), t(R, K), t(N_LINEAR, R)),
                          (t(M, K), t(N_QKV, K), t(2 * R, K), t(2 * N_QKV // 3, R))]
                if all(get_backend_impl(name).reject_reason(*probe) is None for probe in probes):
                    marks = [pytest.mark.gpu] if device == "cuda" else []
                    out.append(pytest.param(name, device, dtype, id=f"{name}-{device}-{label}", marks=marks))
    return out


CASES = _cases()
# the registered op's route (what torch.compile, export and dispatch modes see) as well as the eager route, in fp32
ROUTED = [pytest.param(*c.values, "eager", id=c.id + "-eager", marks=c.marks) for c in CASES] + [
    pytest.param(*c.values, "op", id=c.id + "-op", marks=c.marks) for c in CASES if c.values[2] == torch.float32]


class _Dispatch(torch.utils._python_dispatch.TorchDispatchMode):
    """A pass-through dispatch mode: with one active, the module runs through the registered op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def kernel_keep_mask(backend: str, seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The boolean keep mask ``(rows, cols)`` the named backend draws for ``seed`` (each backend has its own)."""
    if backend == "torch":
        if seed.is_cpu:
            return dropout_keep_mask(int(seed.item()), rows, cols, p, seed.device)
        return hashed_keep_mask(seed, rows, cols, p)
    if backend == "triton":
        from lora_fused.kernels.triton import triton_dropout_keep_mask

        return triton_dropout_keep_mask(seed, rows, cols, p)
    return get_backend_impl(backend).keep_mask(seed, rows, cols, p)


def context_seeds(out: torch.Tensor) -> int:
    """How many seeds the autograd graph behind ``out`` keeps as Python ints on its nodes' contexts (the eager
    route of a backend that declares ``cpu_int_seed``, on CPU tensors) rather than as saved tensors."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += hasattr(node, "host_seed")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


def count_saved(fn, exclude, ptrs=None):
    """``(bytes, seeds, out)``: bytes of every distinct storage ``saved_tensors_hooks`` sees while ``fn()`` runs
    (one-element tensors included, storages of ``exclude`` left out), and how many one-element int64 tensors
    (dropout seeds) were among them. ``ptrs``, a set, receives the saved storages' addresses."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, seeds = {}, {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
            if t.numel() == 1 and t.dtype == torch.int64:
                seeds[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    if ptrs is not None:
        ptrs.update(seen)
    return sum(seen.values()), len(seeds), out


def _module(cls, p, dtype, device):
    torch.manual_seed(0)
    if cls == "linear":
        m = LoRALinear(K, N_LINEAR, r=R, lora_dropout=p)
    else:
        m = LoRAQKV(K, N_QKV, r=R, lora_dropout=p, targets="qv")
    with torch.no_grad():
        m.lora_B.normal_()
    return m.to(device=device, dtype=dtype).train()


# (A trains, B trains, x requires grad, W trains)
COMBOS = [
    (True, True, True, False),   # standard LoRA
    (False, True, True, False),  # LoRA-FA
    (True, True, False, False),  # first layer, standard
    (False, True, False, False),  # first layer, LoRA-FA: dB alone
    (False, True, True, True),   # LoRA-FA with the base unfrozen: x back for dW
    (True, False, True, False),  # B frozen: no h
    (False, False, True, False),  # adapters frozen: dx only
]


@pytest.mark.parametrize("backend,device,dtype,route", ROUTED)
@pytest.mark.parametrize("cls", ["linear", "qkv"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("a_trains,b_trains,x_grad,w_trains", COMBOS)
def test_saved_bytes_and_gradients(backend, device, dtype, route, cls, p, a_trains, b_trains, x_grad, w_trains):
    m = _module(cls, p, dtype, device)
    m.lora_A.requires_grad_(a_trains)
    m.lora_B.requires_grad_(b_trains)
    m.weight.requires_grad_(w_trains)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*M_SHAPE, K, generator=gen).to(device=device, dtype=dtype).requires_grad_(x_grad)
    n_h, el = m.lora_A.shape[0], x.element_size()

    def forward():
        torch.manual_seed(SEED)
        with use_backend(backend), (_Dispatch() if route == "op" else contextlib.nullcontext()):
            return m(x)

    nbytes, n_seeds, y = count_saved(forward, exclude=list(m.parameters()))
    keep_x = a_trains or w_trains  # dA and dW need x
    keep_h = b_trains  # dB needs h
    keep_seed = p > 0 and (x_grad or a_trains)  # the mask of dx or dA
    int_seeds = context_seeds(y)  # seeds kept as ints (CPU eager route of the torch backend): no tensor
    expected = (x.numel() * el if keep_x else 0) + (M * n_h * el if keep_h else 0) + 8 * (int(keep_seed) - int_seeds)
    assert nbytes == expected, (nbytes, expected)
    assert n_seeds + int_seeds == int(keep_seed), (n_seeds, int_seeds)

    g = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
    with use_backend(backend):
        (y * g).sum().backward()

    # float64 reference with the backend's own mask: the same generator state gives the same seed
    torch.manual_seed(SEED)
    seed = draw_seed(x)
    keep = kernel_keep_mask(backend, seed, M, K, p).view(*M_SHAPE, K) if p else None
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in
              (("x", x), ("W", m.weight), ("b", m.bias), ("A", m.lora_A), ("B", m.lora_B))}
    ref = naive_lora(leaves["x"], leaves["W"], leaves["b"], leaves["A"], leaves["B"], m.scaling, keep, p,
                     m.lora_slices())
    assert_close_dtype(y, ref, dtype)
    (ref * g.double()).sum().backward()
    computed = {"x": x.grad, "W": m.weight.grad, "b": m.bias.grad, "A": m.lora_A.grad, "B": m.lora_B.grad}
    wanted = {"x": x_grad, "W": w_trains, "b": False, "A": a_trains, "B": b_trains}
    for name, got in computed.items():
        assert (got is not None) == wanted[name], name
        if got is not None:
            assert got.dtype == dtype
            assert_close_dtype(got, leaves[name].grad, dtype, "grad", msg=f"grad of {name}")


# -- LoRA-FA at module level ------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """A fused qkv feeding an output projection (no other op saves anything for backward)."""

    def __init__(self, dim: int = K):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(3 * dim, dim)

    def forward(self, x):
        return self.proj(self.qkv(x))


def _fa_model(how: str, p: float, dtype, device):
    """An ``Attention`` whose qkv adapts q and v and whose proj adapts everything, both LoRA-FA, made through
    ``inject_lora`` (keyword), ``LoraConfig`` or the modules' own keyword."""
    torch.manual_seed(0)
    model = Attention()
    if how == "inject":
        lf.inject_lora(model, ["qkv", "proj"], qkv_targets="qv", r=R, lora_dropout=p, lora_fa=True)
    elif how == "config":
        lf.inject_lora(model, lf.LoraConfig(["qkv", "proj"], qkv_targets="qv", r=R, lora_dropout=p, lora_fa=True))
    else:
        model.qkv = LoRAQKV.from_linear(model.qkv, targets="qv", r=R, lora_dropout=p, lora_fa=True)
        model.proj = LoRALinear.from_linear(model.proj, r=R, lora_dropout=p, lora_fa=True)
        model.requires_grad_(False)
        for mod in (model.qkv, model.proj):
            mod.lora_B.requires_grad_(True)
    with torch.no_grad():
        for mod in (model.qkv, model.proj):
            mod.lora_B.normal_()
    return model.to(device=device, dtype=dtype).train()


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("how", ["inject", "config", "module"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("x_grad", [False, True])
def test_lora_fa_model_saves_h_only_and_gradients_match(backend, device, dtype, how, p, x_grad):
    model = _fa_model(how, p, dtype, device)
    qkv, proj = model.qkv, model.proj
    assert qkv.lora_fa and proj.lora_fa
    assert {n for n, t in model.named_parameters() if t.requires_grad} == {
        "qkv.lora_adapters.default.lora_B", "proj.lora_adapters.default.lora_B"}
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*M_SHAPE, K, generator=gen).to(device=device, dtype=dtype).requires_grad_(x_grad)
    inputs = []
    hooks = [mod.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for mod in (qkv, proj)]
    seen_ptrs = set()

    def forward():
        torch.manual_seed(SEED)
        with use_backend(backend):
            return model(x)

    nbytes, n_seeds, y = count_saved(forward, exclude=list(model.parameters()), ptrs=seen_ptrs)
    for h in hooks:
        h.remove()
    el = x.element_size()
    # h of each layer (M x T·r); a seed where the mask is needed: proj's input requires grad (qkv's B trains),
    # qkv's only when x does
    seeds = (int(x_grad) + 1) if p > 0 else 0
    int_seeds = context_seeds(y)
    assert nbytes == M * (2 * R + R) * el + 8 * (seeds - int_seeds)
    assert n_seeds + int_seeds == seeds
    assert not {t.untyped_storage().data_ptr() for t in inputs} & seen_ptrs, "a LoRA input was saved"

    g = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype)
    with use_backend(backend):
        (y * g).sum().backward()
    assert qkv.lora_A.grad is None and proj.lora_A.grad is None and qkv.weight.grad is None

    # float64 reference through both layers, with the masks the backend drew (seeds in call order)
    torch.manual_seed(SEED)
    keeps = []
    for cols in (K, 3 * K):
        seed = draw_seed(x) if p > 0 else None
        keeps.append(kernel_keep_mask(backend, seed, M, cols, p).view(*M_SHAPE, cols) if p else None)
    d = {name: t.detach().double().requires_grad_(True) for name, t in
         (("x", x), ("Bq", qkv.lora_B), ("Bp", proj.lora_B))}
    mid = naive_lora(d["x"], qkv.weight.double(), qkv.bias.double(), qkv.lora_A.double(), d["Bq"], qkv.scaling,
                     keeps[0], p, qkv.lora_slices())
    ref = naive_lora(mid, proj.weight.double(), proj.bias.double(), proj.lora_A.double(), d["Bp"], proj.scaling,
                     keeps[1], p, proj.lora_slices())
    assert_close_dtype(y, ref, dtype)
    (ref * g.double()).sum().backward()
    assert_close_dtype(qkv.lora_B.grad, d["Bq"].grad, dtype, "grad", msg="dB of qkv")
    assert_close_dtype(proj.lora_B.grad, d["Bp"].grad, dtype, "grad", msg="dB of proj")
    if x_grad:
        assert_close_dtype(x.grad, d["x"].grad, dtype, "grad", msg="dx")
    else:
        assert x.grad is None


def test_lora_fa_on_a_real_model_drops_exactly_the_lora_inputs():
    """timm ViT: LoRA-FA saves exactly bytes(x of every LoRA module) less than standard LoRA (and the seed of the
    first LoRA module, whose input needs no gradient: no dx, no dA, no mask), and none of those inputs is among
    its saved tensors (the standard model saves every one of them)."""
    pytest.importorskip("timm")
    from model_helpers import tiny_vit

    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    measured = {}
    for fa in (False, True):
        model = tiny_vit()
        lf.inject_lora(model, ["qkv", "fc1", "fc2"], qkv_targets="qv", r=R, lora_dropout=0.1, lora_fa=fa)
        model.train()
        inputs = []
        for mod in model.modules():
            if isinstance(mod, lf.LoRABase):
                mod.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
        ptrs = set()
        nbytes, seeds, out = count_saved(lambda model=model: model(img),
                                         exclude=list(model.parameters()) + list(model.buffers()), ptrs=ptrs)
        input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
        measured[fa] = (nbytes, seeds, context_seeds(out), sum(t.untyped_storage().nbytes() for t in inputs),
                        input_ptrs & ptrs, input_ptrs)
    (std_bytes, std_seeds, std_ints, x_bytes, std_saved_inputs, std_inputs) = measured[False]
    (fa_bytes, fa_seeds, fa_ints, _, fa_saved_inputs, _) = measured[True]
    assert len(std_inputs) == 6 and std_saved_inputs == std_inputs
    assert not fa_saved_inputs
    assert (std_seeds + std_ints, fa_seeds + fa_ints) == (6, 5)
    assert std_bytes - fa_bytes == x_bytes + 8 * (std_seeds - fa_seeds)
