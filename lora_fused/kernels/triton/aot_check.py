"""Compile every Triton kernel ahead of time for sm_90 and sm_80, without a GPU (Triton's bundled ptxas).

    python -m lora_fused.kernels.triton.aot_check            # sm_90 + sm_80, bf16/fp16/fp32, first+last configs
    python -m lora_fused.kernels.triton.aot_check --quick    # sm_90 bf16, first config, dropout on (the CI test)
    python -m lora_fused.kernels.triton.aot_check --all      # every config of every list

The interpreter (how CI runs the kernels) checks the math but not what only the GPU compiler sees (layouts,
tl.dot operand types, shared-memory budgets). This runs the real compiler down to a cubin, so a kernel that
would fail to compile on an H100/A100 fails here. Run it with ``TRITON_INTERPRET`` unset (in the interpreter
the kernels are not compiled; it exits 2 saying so). Exit status 1 when any compile fails.
"""

from __future__ import annotations

import os
import sys
import time

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import dropout_mask, lora_bwd_da, lora_bwd_dh_db, lora_bwd_dx, lora_down, lora_linear_fwd  # noqa: E402

_FLOATS = {"scaling", "drop_scale", "dh_scale"}
_FP32_PTRS = {"db_ptr", "da_ptr"}
# Specialization as the JIT sees contiguous tensors at aligned shapes (e.g. K = N = 4096): unit inner strides
# become constants, pointers and shape/outer-stride ints carry 16-divisibility (what enables async pipelining).
_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_ak", "stride_hr", "stride_br", "stride_yn", "stride_gn",
                 "stride_dr"}
_DIV16_INTS = {"M", "N", "K", "stride_xm", "stride_wn", "stride_am", "stride_hm", "stride_bn", "stride_ym",
               "stride_gm", "stride_dm"}


def _signature(fn, dt, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "seed_ptr":
            sig[name] = "*i64"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dt
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(fn, dt: str, consts: dict, arch: int):
    consts = dict(consts)
    opts = {k: consts.pop(k) for k in ("num_warps", "num_stages") if k in consts}
    consts.update({name: 1 for name in fn.arg_names if name in _UNIT_STRIDES})
    sig = _signature(fn, dt, consts)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name] != "constexpr" and (sig[name].startswith("*") or name in _DIV16_INTS)
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


# Shared memory per block the hardware grants (opt-in maximum): H100 227 KiB, A100 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}


def _cfg(c):
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _config_lists():
    return [getattr(mod, name) for mod, base in ((lora_down, "DOWN"), (lora_bwd_dx, "DX"), (lora_bwd_da, "DA"),
                                                 (lora_linear_fwd, "GEMM"), (lora_bwd_dh_db, "DHDB"))
            for name in (f"{base}_CONFIGS_SM90", f"{base}_CONFIGS_SM80")]


def jobs(mode: str = "default"):
    """``(kernel, dtype, constexprs+options, arch, config)`` tuples to compile."""
    archs = ((90, "SM90"),) if mode == "quick" else ((90, "SM90"), (80, "SM80"))
    dtypes = ("bf16",) if mode == "quick" else ("bf16", "fp16", "fp32")
    drops = (True,) if mode == "quick" else (False, True)

    def pick(lst):
        return lst if mode == "all" else (lst[:1] if mode == "quick" else lst[:1] + lst[-1:])

    out = []
    for arch, sfx in archs:
        for dt in dtypes:
            prec = "ieee" if dt == "fp32" else "tf32"
            for drop in drops:
                for c in pick(getattr(lora_down, "DOWN_CONFIGS_" + sfx)):
                    for br in ((16, 128) if mode != "quick" else (128,)):
                        out.append((lora_down._lora_down_kernel, dt,
                                    dict(_cfg(c), HAS_DROPOUT=drop, DOT_PREC=prec, BLOCK_R=br), arch, c))
                for c in pick(getattr(lora_bwd_dx, "DX_CONFIGS_" + sfx)):
                    out.append((lora_bwd_dx._lora_bwd_dx_kernel, dt,
                                dict(_cfg(c), HAS_DROPOUT=drop, DOT_PREC=prec, BLOCK_R=128), arch, c))
                for c in pick(getattr(lora_bwd_da, "DA_CONFIGS_" + sfx)):
                    out.append((lora_bwd_da._lora_bwd_da_kernel, dt,
                                dict(_cfg(c), HAS_DROPOUT=drop, DOT_PREC=prec, BLOCK_R=128), arch, c))
            for c in pick(getattr(lora_linear_fwd, "GEMM_CONFIGS_" + sfx)):
                for nt in ((1, 3) if mode != "quick" else (3,)):
                    out.append((lora_linear_fwd._lora_linear_fwd_kernel, dt,
                                dict(_cfg(c), NUM_T=nt, HAS_BIAS=True, DOT_PREC=prec, BLOCK_R=128), arch, c))
            for c in pick(getattr(lora_bwd_dh_db, "DHDB_CONFIGS_" + sfx)):
                variants = ((2, True, True),) if mode == "quick" else ((1, True, True), (2, True, False), (3, False, True))
                for nt, dh, db in variants:
                    out.append((lora_bwd_dh_db._lora_bwd_dh_db_kernel, dt,
                                dict(_cfg(c), NUM_T=nt, DO_DH=dh, DO_DB=db, DOT_PREC=prec, BLOCK_R=128), arch, c))
        out.append((dropout_mask._keep_mask_kernel, "i8", dict(BLOCK_M=16, BLOCK_K=32), arch, None))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mode = "quick" if "--quick" in argv else ("all" if "--all" in argv else "default")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the interpreter does not compile kernels)")
        return 2
    todo = jobs(mode)
    print(f"{len(todo)} kernels to compile (triton {triton.__version__})", flush=True)
    fails = 0
    # every config list ends with a small entry that must fit in shared memory for every dtype and variant
    # (autotuning skips larger ones that do not fit, so a list always has a runnable config)
    must_fit = {id(fn_list[-1]) for fn_list in _config_lists()}
    for fn, dt, consts, arch, cfg in todo:
        t = time.time()
        desc = f"{fn.__name__} sm_{arch} {dt} {consts}"
        try:
            k = compile_kernel(fn, dt, consts, arch)
        except Exception as exc:  # report every failure, then exit 1
            fails += 1
            last = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
            print(f"FAIL {desc}: {type(exc).__name__}: {last}", flush=True)
            continue
        smem = k.metadata.shared
        status = "ok  "
        if smem > SMEM_LIMIT[arch]:
            if cfg is not None and id(cfg) in must_fit:
                fails += 1
                status = "FAIL"
            else:
                status = "big "  # over the budget: the autotuner skips it on this GPU
        print(f"{status} {time.time() - t:5.1f}s smem={smem:6d} {desc}", flush=True)
    print(f"{fails} failed of {len(todo)}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
