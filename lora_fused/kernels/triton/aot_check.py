"""Static proof of the Triton kernels on a GPU architecture, without a GPU (Triton's compiler and bundled ptxas).

    python -m lora_fused.kernels.triton.aot_check --arch 90 [--dump DIR] [--shapes headline,vit_b_qkv]
                                                  [--dtypes bf16,fp16,fp32] [--first]

The launchers run on meta tensors of each shape as if on the GPU (``aot_capture``): every launch they make is
recorded with its real arguments, and each config the autotuner may pick there (the list of the architecture,
pruned by the shared-memory estimate as the autotuner prunes it) is compiled with exactly the JIT's
specialization (Triton's own binder: 16-divisibility of pointers and ints, ints equal to 1 as constants).
Per compiled kernel it reports: wgmma (``wgmma.mma_async``) and TMA (``cp.async.bulk.tensor``) in the PTX,
persistent (a tile loop strided by the grid size), shared memory against the architecture's limit and against
the pruning estimate, registers and spill bytes (ptxas -v), and the static count of Philox rounds per element of
the keep-mask tile a thread handles (``mul.hi.u32`` / 2 per round; 10 rounds per 8 elements is one Philox call
per 8 decisions: 1.25, less where constant rounds fold). ``--dump DIR`` writes ``DIR/<kernel>-<config>.ttgir``
and ``.ptx``. Exit status 1 when a compile fails or a check fails: a GEMM kernel of sm_90 without wgmma or TMA or
not persistent, spills, a kept config over the shared-memory limit, or an estimate below the real usage.
Importable without a GPU; needs torch (meta tensors) and Triton (3.6 or later). Unset TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import _common
from .lora_linear import triton_lora_backward, triton_lora_forward

# Opt-in shared memory per block and SM count: H100 SXM (sm_90), A100 (sm_80).
SMEM_LIMIT = {90: 232448, 80: 166912}
SMS = {90: 132, 80: 108}

# (M, K, N, r, lora_slices, dropout): the headline LLM projection and ViT-B's fused qkv (B·S = 8·197, q and v).
SHAPES = {
    "headline": (16384, 4096, 4096, 16, [0, 4096], 0.1),
    "vit_b_qkv": (1576, 768, 2304, 16, [0, 768, 1536, 768], 0.1),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Kernels that must be Hopper GEMMs on sm_90: wgmma, TMA, persistent.
GEMM_KERNELS = {"_lora_fwd_persistent_kernel", "_lora_bwd_persistent_kernel"}
# Keep-mask sites per kernel (how many tiles of the mask one work item generates) and the mask tile's block names.
MASK_SITES = {
    "_lora_fwd_persistent_kernel": (1, "BLOCK_M", "BLOCK_K"),
    "_lora_bwd_persistent_kernel": (2, "BLOCK_M", "BLOCK_K"),
    "_lora_down_kernel": (1, "BLOCK_M", "BLOCK_K"),
    "_lora_bwd_da_kernel": (1, "BLOCK_M", "BLOCK_K"),
    "_lora_bwd_dx_kernel": (1, "BLOCK_M", "BLOCK_K"),
}


@dataclass
class Result:
    kernel: str
    variant: str
    config: str
    ok: bool = True
    notes: List[str] = field(default_factory=list)
    smem: int = 0
    estimate: Optional[int] = None
    regs: int = 0
    spill: int = 0
    wgmma: int = 0
    tma: int = 0
    persistent: bool = False
    philox: Optional[float] = None
    seconds: float = 0.0


def _config_name(c) -> str:
    kw = "-".join(f"{k.replace('BLOCK_', 'b').lower()}{v}" for k, v in c.kwargs.items() if k != "GROUP_M")
    return f"{kw}-w{c.num_warps}-s{c.num_stages}"


def capture(arch: int, shape: str, dtype: torch.dtype, deterministic: bool):
    """The launches of one forward and one full backward (dx, dA, dB) at ``shape`` on a simulated sm_``arch``."""
    M, K, N, r, slices, p = SHAPES[shape]
    T = len(slices) // 2

    def mk(*s):
        return torch.empty(*s, dtype=dtype, device="meta")

    x, W, b, A, B = mk(M, K), mk(N, K), mk(N), mk(T * r, K), mk(sum(slices[1::2]), r)
    seed = torch.zeros(1, dtype=torch.int64, device="meta")
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with _common.aot_capture(arch, SMS[arch], SMEM_LIMIT[arch]) as launches:
            triton_lora_forward(x, W, b, A, B, 2.0, p, seed, slices)
            triton_lora_backward(mk(M, N), x, W, A, B, mk(M, T * r), 2.0, p, seed, slices,
                                 [True, False, False, True, True])
    finally:
        torch.use_deterministic_algorithms(saved)
    return launches


def _ptxas_usage(ptx: str, arch: int):
    """(registers, spill store + load bytes) from ptxas -v, the compiler Triton ships."""
    from triton.backends.nvidia.compiler import get_ptxas

    exe = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([exe, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def compile_launch(tuned, args, kwargs, config, arch: int):
    """Compile one config of a recorded launch with the JIT's exact specialization; returns the CompiledKernel."""
    fn = tuned.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kw = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def candidate_configs(tuned, args, kwargs, arch: int, first: bool):
    """The configs the autotuner may run for this launch on sm_``arch`` (pruned by the estimate as it does)."""
    configs = tuned.configs["sm90" if arch >= 90 else "sm80"]
    if tuned.smem is None:
        return list(configs[:1] if first else configs)
    named = dict(zip(tuned.fn.arg_names, args))
    elem = next(v for v in named.values() if torch.is_tensor(v)).element_size()
    kept = _common.pick_configs(configs, tuned.smem, SMEM_LIMIT[arch], elem, {**named, **kwargs}, full=not first)
    return kept


def check_launch(tuned, args, kwargs, arch: int, variant: str, first: bool, dump: Optional[str]):
    results = []
    named = dict(zip(tuned.fn.arg_names, args))
    elem = next(v for v in named.values() if torch.is_tensor(v)).element_size()
    name = tuned.fn.__name__
    for c in candidate_configs(tuned, args, kwargs, arch, first):
        res = Result(name, variant, _config_name(c))
        t = time.time()
        try:
            k = compile_launch(tuned, args, kwargs, c, arch)
        except Exception as exc:  # report every failure, then exit 1
            res.ok = False
            last = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            res.notes.append(f"compile failed: {last}")
            results.append(res)
            continue
        ptx = k.asm["ptx"]
        res.seconds = time.time() - t
        res.smem = k.metadata.shared
        if tuned.smem is not None:
            res.estimate = tuned.smem({**named, **kwargs, **c.kwargs, "num_stages": c.num_stages}, elem)
        res.regs, res.spill = _ptxas_usage(ptx, arch)
        res.wgmma = ptx.count("wgmma.mma_async")
        res.tma = ptx.count("cp.async.bulk.tensor")
        res.persistent = "%nctaid.x" in ptx
        if name in MASK_SITES and kwargs.get("HAS_DROPOUT"):
            sites, bm, bk = MASK_SITES[name]
            per_thread = c.kwargs[bm] * c.kwargs[bk] / (32 * c.num_warps)
            res.philox = ptx.count("mul.hi.u32") / 2 / (sites * per_thread)
        if dump:
            base = os.path.join(dump, f"{name.strip('_')}-{variant}-{res.config}")
            for ext in ("ttgir", "ptx"):
                with open(f"{base}.{ext}", "w") as f:
                    f.write(k.asm[ext])
        if res.smem > SMEM_LIMIT[arch]:
            res.ok = False
            res.notes.append(f"shared memory {res.smem} over the limit {SMEM_LIMIT[arch]}")
        if res.estimate is not None and res.estimate < res.smem:
            res.ok = False
            res.notes.append(f"pruning estimate {res.estimate} below the real {res.smem}")
        if res.spill:
            res.ok = False
            res.notes.append(f"{res.spill} bytes of spills")
        if arch >= 90 and name in GEMM_KERNELS and not (res.wgmma and res.tma and res.persistent):
            res.ok = False
            res.notes.append("not a persistent wgmma+TMA kernel")
        results.append(res)
    return results


def run(arch: int, shapes, dtypes, first: bool = False, dump: Optional[str] = None, out=print):
    """Compile and check every launch; returns the list of ``Result``."""
    if dump:
        os.makedirs(dump, exist_ok=True)
    results = []
    for shape in shapes:
        for dt in dtypes:
            seen = set()
            for det in (False, True):
                for tuned, _grid, args, kwargs in capture(arch, shape, DTYPES[dt], det):
                    flags = "".join(k[:2].lower() + ("1" if v else "0") for k, v in sorted(kwargs.items())
                                    if isinstance(v, bool))
                    variant = f"{shape}-{dt}-{flags}"
                    key = (tuned.fn.__name__, variant)
                    if key in seen:  # the deterministic switch changes only the reductions
                        continue
                    seen.add(key)
                    for res in check_launch(tuned, args, kwargs, arch, variant, first, dump):
                        results.append(res)
                        out(format_row(res))
    return results


HEADER = ("| kernel | variant | config | wgmma | TMA | persistent | smem (est.) / limit | regs | spill B | "
          "Philox rounds/elem | ok |")


def format_row(r: Result) -> str:
    ph = f"{r.philox:.2f}" if r.philox is not None else "–"
    est = f" ({r.estimate})" if r.estimate is not None else ""
    ok = "ok" if r.ok else "FAIL: " + "; ".join(r.notes)
    return (f"| {r.kernel.strip('_')} | {r.variant} | {r.config} | {r.wgmma} | {r.tma} | "
            f"{'yes' if r.persistent else 'no'} | {r.smem}{est} | {r.regs} | {r.spill} | {ph} | {ok} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_fused.kernels.triton.aot_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT))
    ap.add_argument("--dump", default=None, help="write <kernel>-<variant>-<config>.{ttgir,ptx} here")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    ap.add_argument("--dtypes", default="bf16", help="comma-separated of bf16, fp16, fp32")
    ap.add_argument("--first", action="store_true", help="only the first config that fits (as with autotuning off)")
    args = ap.parse_args(argv)
    if _common.interpreting():
        print("aot_check: unset TRITON_INTERPRET (the interpreter does not compile kernels)")
        return 2
    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    print(f"triton {triton.__version__}, sm_{args.arch}, shapes {shapes}, dtypes {dtypes}")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    t = time.time()
    results = run(args.arch, shapes, dtypes, args.first, args.dump)
    fails = sum(not r.ok for r in results)
    print(f"{fails} failed of {len(results)} compiled kernels in {time.time() - t:.0f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
