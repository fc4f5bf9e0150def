"""Cost model of the Triton kernels: bytes moved, FLOPs and the time they imply at an H100's limits, per kernel,
next to the frozen floor (``python -m benchmarks --model``). A model, not a measurement.

Each kernel's time is ``max(bytes / BW, FLOPs / MMA) + exposed RNG + launch``: a compute-bound kernel hides the
bytes it moves under its MMAs (so an x or g tile read inside a GEMM costs no time while the GEMM stays
compute-bound), a separate memory-bound kernel does not. The keep mask costs ``ISSUE_PER_ELEM`` issue slots per
element per Philox generation (one Philox-4x32-10 call and the packing of its 8 bits serve 8 elements), times the replication the compiled kernel shows (``aot_check``: Philox rounds per element / 1.25),
plus ``MASK_MOVE_PER_ELEM`` slots where the packed bits are moved to an MMA accumulator's layout and unpacked
there (dx); RNG interleaved with a K loop of async wgmma is taken as 25 % exposed, RNG in a tile's
prologue/epilogue (tensor cores idle) as fully exposed. Both GEMM paths are taken at the same efficiency as the floor's cuBLAS
GEMM (``--gemm-eff`` scales ours), so the ratio isolates what the LoRA terms add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

# H100 SXM, bf16 dense.
BW = 3.0e12            # B/s, HBM3
MMA = 800e12           # FLOP/s, bf16 dense tensor cores (sustained order of magnitude)
ISSUE = 132 * 4 * 32 * 1.755e9   # lane-instructions per second (132 SMs × 4 schedulers × 32 lanes × clock)
# Issue slots per mask element per Philox generation: the compiled mask code (sm_90 PTX of a 128×128 masked
# accumulator, with and without the mask) has ≈ 16 instructions per element for Philox and the bit packing at
# 1.04 rounds per element, plus 2 per round for the half-rate mul.hi; rounded up.
ISSUE_PER_ELEM = 20.0
# Issue slots per element to pack 2 bits of 16 bytes per word, move the words through shared memory and unpack
# them in the accumulator's layout (shift, and, compare, select): 9.4 PTX instructions per element in the same
# measurement, rounded up.
MASK_MOVE_PER_ELEM = 10.0
LAUNCH = 2e-6          # s per extra launch (memset of the flags, a reduction)
# Measured statically by aot_check (sm_90, headline shape; Triton 3.6 and 3.8 agree): Philox rounds per mask
# element of the compiled kernels (the configs the autotuner may pick: the largest value); 1.25 (10 rounds per
# 8 elements) is one generation, less where the first round folds constants.
PHILOX_ROUNDS = {"fwd": 1.12, "dx": 1.05, "down": 1.12, "da": 1.06, "dx_ptr": 1.12}
IDEAL_ROUNDS = 1.25


@dataclass
class Row:
    path: str
    kernel: str
    bytes: float
    flops: float
    rng_elems: float = 0.0      # mask elements generated
    rng_exposed: float = 0.0    # fraction of the RNG time on the critical path
    rounds: float = IDEAL_ROUNDS
    launches: int = 1
    move: float = 0.0           # issue slots per element moving the bits to an MMA layout (``MASK_MOVE_PER_ELEM``)

    @property
    def t_mem(self):
        return self.bytes / BW

    @property
    def t_mma(self):
        return self.flops / MMA

    @property
    def t_rng(self):
        per_elem = ISSUE_PER_ELEM * (self.rounds / IDEAL_ROUNDS) + self.move
        return self.rng_elems * per_elem / ISSUE * self.rng_exposed

    @property
    def time(self):
        return max(self.t_mem, self.t_mma) + self.t_rng + (self.launches - 1) * LAUNCH


def model(M: int, K: int, N: int, r: int, T: int = 1, p: float = 0.1, e: int = 2, deterministic: bool = False,
          dx_rounds: float = PHILOX_ROUNDS["dx"]) -> List[Row]:
    """Rows for the floor (frozen layer: y = x Wᵀ, dx = g W), the persistent design and the pointer kernels."""
    TR = T * r
    drop = p > 0
    mk = M * K if drop else 0
    gemm = 2.0 * M * N * K
    io_fwd = (M * K + N * K + M * N) * e
    io_dx = (M * N + N * K + M * K) * e
    small = (M * TR + N * r + TR * K) * e
    rows = [
        Row("floor", "y = x Wᵀ (cuBLAS)", io_fwd, gemm),
        Row("floor", "dx = g W (cuBLAS)", io_dx, gemm),
    ]
    # persistent: 128×128 dx tiles and 128×256 forward tiles (the first configs of the spill-free lists)
    bm_dx, bn_fwd = 128, 256
    parts = -(-M // bm_dx)
    h_reads = -(-N // bn_fwd) * M * TR * e
    rows.append(Row("persistent", "fwd: y, h from the GEMM's x tiles", io_fwd + small + h_reads,
                    gemm + 2.0 * M * K * TR + 2.0 * M * N * TR, mk, 0.25, PHILOX_ROUNDS["fwd"], launches=2))
    red_bytes = parts * (N * r + TR * K) * 4 * 2  # partial writes (deterministic) or atomic read-modify-writes
    rows.append(Row("persistent", "bwd: dx, dh'+dB from its g tiles, dA from its mask", io_dx + M * K * e + small
                    + red_bytes, gemm + 2.0 * M * N * TR * 2 + 2.0 * M * K * TR * 2,
                    mk, 1.0, dx_rounds, launches=2, move=MASK_MOVE_PER_ELEM))
    if deterministic:
        rows.append(Row("persistent", "bwd: fixed-order sum of the dA/dB partials", parts * (N * r + TR * K) * 4,
                        0.0))
    # pointer kernels (the sm_80 path): two memory-bound passes plus the GEMMs
    rows += [
        Row("pointer", "fwd 1: h = x̂ Aᵀ", M * K * e + small, 2.0 * M * K * TR, mk, 0.0, PHILOX_ROUNDS["down"]),
        Row("pointer", "fwd 2: y = x Wᵀ + b + s·h Bᵀ", io_fwd + small, gemm + 2.0 * M * N * TR),
        Row("pointer", "bwd 1: dh', dB from g", M * N * e + small, 4.0 * M * N * TR),
        Row("pointer", "bwd 2: dx = g W + keep∘(dh' A)", io_dx + small, gemm + 2.0 * M * K * TR, mk, 1.0,
            PHILOX_ROUNDS["dx_ptr"], move=MASK_MOVE_PER_ELEM),
        Row("pointer", "bwd 3: dA = dh'ᵀ x̂", M * K * e + small, 2.0 * M * K * TR, mk, 0.0, PHILOX_ROUNDS["da"]),
    ]
    for row in rows:  # a memory-bound kernel hides its RNG when the issue slots fit under the memory time
        if row.rng_exposed == 0.0 and row.rng_elems:
            rng_full = row.rng_elems * (ISSUE_PER_ELEM * (row.rounds / IDEAL_ROUNDS) + row.move) / ISSUE
            row.rng_exposed = max(0.0, rng_full - row.t_mem) / rng_full
    return rows


def totals(rows: Sequence[Row]):
    out = {}
    for row in rows:
        d = "fwd" if row.kernel.startswith(("fwd", "y =")) else "bwd"
        out.setdefault(row.path, {"fwd": 0.0, "bwd": 0.0})[d] += row.time
    return out


def table(M, K, N, r, T=1, p=0.1, deterministic=False, dx_rounds=PHILOX_ROUNDS["dx"]) -> str:
    rows = model(M, K, N, r, T, p, deterministic=deterministic, dx_rounds=dx_rounds)
    lines = [f"Cost model at M={M}, K={K}, N={N}, r={r}, T={T}, p={p:g}, bf16, H100 SXM (BW {BW / 1e12:g} TB/s, "
             f"MMA {MMA / 1e12:g} TFLOP/s){', deterministic' if deterministic else ''}",
             "",
             "| path | kernel | MB moved | GFLOP | t_mem µs | t_mma µs | RNG exposed µs | time µs | bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        bound = "memory" if row.t_mem > row.t_mma else "compute"
        lines.append(f"| {row.path} | {row.kernel} | {row.bytes / 2**20:.0f} | {row.flops / 1e9:.1f} | "
                     f"{row.t_mem * 1e6:.1f} | {row.t_mma * 1e6:.1f} | {row.t_rng * 1e6:.1f} | "
                     f"{row.time * 1e6:.1f} | {bound} |")
    tot = totals(rows)
    floor = tot["floor"]
    lines.append("")
    lines.append("| path | fwd µs | bwd µs | fwd+bwd µs | fwd / floor | fwd+bwd / floor |")
    lines.append("|---|---|---|---|---|---|")
    for path, t in tot.items():
        lines.append(f"| {path} | {t['fwd'] * 1e6:.0f} | {t['bwd'] * 1e6:.0f} | {(t['fwd'] + t['bwd']) * 1e6:.0f} | "
                     f"{t['fwd'] / floor['fwd']:.3f} | {(t['fwd'] + t['bwd']) / (floor['fwd'] + floor['bwd']):.3f} |")
    return "\n".join(lines)


HEADLINE = (16384, 4096, 4096)
VIT_B_QKV = (1576, 768, 2304)


def main(rank: int = 16, ps: Sequence[float] = (0.1,)) -> int:
    p = max(ps) if ps else 0.1
    M, K, N = HEADLINE
    print(table(M, K, N, rank, 1, p))
    print()
    print(table(M, K, N, rank, 1, p, deterministic=True))
    print()
    M, K, N = VIT_B_QKV
    print(table(M, K, N, rank, 2, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
