// Planning shared by the binding (host) and the kernels (device): tile shapes, the persistent/grouped tile
// order, which K-blocks of the low-rank operands a tile needs, the grids and workspaces of the small kernels,
// the TMA alignment rules, and where each accumulator value of a thread sits in its tile.
//
// Plain C++ with no CUDA or CuTe dependency: csrc/tests/test_plan.cpp compiles this header with the host
// compiler and checks every function here on the CPU (tests/test_cuda_host.py runs it), and
// csrc/tests/test_layouts.cu checks the accumulator maps against CuTe's own partitioning.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LF_HD __host__ __device__ __forceinline__
#define LF_UNROLL _Pragma("unroll")
#else
#define LF_HD inline
#define LF_UNROLL
#endif

namespace lora_fused {

constexpr int kMaxTargets = 3;  // q, k, v
constexpr int kMaxRank = 128;   // per-target rank r

// Output-column slices of the packed adapters: target t updates columns off[t] .. off[t]+cnt[t] of y, uses rows
// t*r .. t*r+r of A and rows boff[t] .. boff[t]+cnt[t] of B (boff[t] = cnt[0] + ... + cnt[t-1]).
struct Slices {
  int ntgt;
  int off[kMaxTargets];
  int cnt[kMaxTargets];
  int boff[kMaxTargets];
};

LF_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
LF_HD int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
LF_HD int imin(int a, int b) { return a < b ? a : b; }
LF_HD int imax(int a, int b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------------ GEMM tiles
// The two big GEMMs (forward y = x W^T + ..., backward dx = g W + ...) as C (M x N) = A (M x Kred) B^T with a
// second, low-rank reduction over R in front (see fwd_lowrank_blocks / dx_lowrank_blocks).
struct GemmTiles {
  int bm, bn, bk;  // CTA tile
  int cluster_m;   // CTAs per cluster along M (they share, and multicast, the B tile)
};
constexpr GemmTiles kSm90Tiles{128, 256, 64, 2};  // 2 consumer warpgroups of 64x256, TMA multicast of B
constexpr GemmTiles kSm80Tiles{128, 256, 32, 1};  // 8 warps of 64x64 (2x4), cp.async

// Work units: a unit is one cluster tile (cluster_m CTA tiles stacked along M, one N tile). Units are
// visited in groups of `group` unit-rows, M fastest inside a group, so that the units in flight at any time
// share a few W tiles and a few row blocks of x (both stay in L2) instead of streaming x once per N tile.
struct TileGrid {
  int m_tiles, n_tiles;  // CTA tiles of the output
  int m_units;           // unit rows: cdiv(m_tiles, cluster_m)
  int units;             // m_units * n_tiles
  int group;             // unit rows per raster group
  int cluster_m;
};

LF_HD TileGrid make_tile_grid(int64_t M, int64_t N, GemmTiles t, int group) {
  TileGrid g;
  g.m_tiles = static_cast<int>(cdiv(M, t.bm));
  g.n_tiles = static_cast<int>(cdiv(N, t.bn));
  g.cluster_m = t.cluster_m;
  g.m_units = static_cast<int>(cdiv(g.m_tiles, t.cluster_m));
  g.units = g.m_units * g.n_tiles;
  g.group = imax(1, imin(group, g.m_units));
  return g;
}

// Unit index -> (unit row mu, N tile n).
LF_HD void unit_coord(const TileGrid& g, int unit, int& mu, int& n) {
  const int per_group = g.group * g.n_tiles;
  const int gi = unit / per_group, rem = unit % per_group;
  const int first = gi * g.group;
  const int gsize = imin(g.group, g.m_units - first);
  mu = first + rem % gsize;
  n = rem / gsize;
}

// Raster group size: 8 unit rows keeps, at the headline shape on an H100 (66 clusters in flight), about
// 8 x 256 rows of x and 8 x 256 rows of W (32 MiB of bf16 at K = 4096) in the 50 MB L2.
constexpr int kRasterGroup = 8;

// Persistent grid of the sm90 kernel: one cluster per `max_clusters` slot, never more clusters than units.
LF_HD int persistent_clusters(const TileGrid& g, int max_clusters) { return imax(1, imin(g.units, max_clusters)); }

// K-blocks [lo, hi) of the low-rank phase that the output columns [n0, n0 + bn) need in the FORWARD: the rank
// columns t*r .. (t+1)*r of every target t whose slice overlaps the tile (the other columns of those blocks
// are zero in the packed s*B operand). A tile that touches no target gets no low-rank block.
LF_HD void fwd_lowrank_blocks(const Slices& sl, int r, int64_t n0, int bn, int bk, int& lo, int& hi) {
  int tlo = kMaxTargets, thi = -1;
  for (int t = 0; t < sl.ntgt; ++t) {
    if (sl.cnt[t] > 0 && sl.off[t] < n0 + bn && sl.off[t] + sl.cnt[t] > n0) {
      tlo = imin(tlo, t);
      thi = imax(thi, t);
    }
  }
  if (thi < 0) {
    lo = hi = 0;
    return;
  }
  lo = (tlo * r) / bk;
  hi = static_cast<int>(cdiv(static_cast<int64_t>(thi + 1) * r, bk));
}

// In dx = g W + mask * (dh' A) every output tile needs all R rank columns.
LF_HD int dx_lowrank_blocks(int R, int bk) { return static_cast<int>(cdiv(R, bk)); }

// ------------------------------------------------------------------------------------------------ TMA / cp.async
// A row-major operand is read by TMA (sm90) or 16-byte cp.async (sm80) without a copy when its base address
// and its row stride are multiples of 16 bytes and its rows are contiguous.
LF_HD bool rows_16b_aligned(uint64_t addr, int64_t row_stride_elems, int64_t inner_stride, int elem_bytes) {
  return inner_stride == 1 && (addr % 16u) == 0 && ((row_stride_elems * elem_bytes) % 16) == 0;
}

// Columns of h / dh' as the GEMMs read them: padded to 8 (16 bytes of bf16) so the row stride suits TMA.
LF_HD int padded_rank_cols(int R) { return static_cast<int>(round_up(R, 8)); }

// ------------------------------------------------------------------------------------------------ small kernels
// All three stream one big operand (x or g) in 64 x 64 chunks and reduce against a rank block of RB columns
// (RB in {16, 32, 64, 128}: a template parameter). Reductions that cross CTAs go through fp32 workspaces
// summed in a fixed order by a second small kernel: no atomics, bitwise reproducible run to run.
constexpr int kSmallRows = 64;       // rows per sub-block
constexpr int kSmallChunk = 64;      // columns per chunk
constexpr int kSmallAccFloats = 8192;  // per-CTA accumulator budget (floats): RB x columns-per-CTA

LF_HD int rank_block(int R) {  // smallest instance >= R, capped at 128 (then several rank blocks)
  return R <= 16 ? 16 : R <= 32 ? 32 : R <= 64 ? 64 : 128;
}

// Forward kernel 1, h = x_hat A^T: CTA = 64 rows x one rank block, a K range (split-K when the row blocks
// alone do not fill the GPU: fp32 partials [splits][M][R], summed by finish_h).
struct DownPlan {
  int rb, r_blocks;   // rank block and how many (R > 128)
  int m_blocks;       // cdiv(M, 64)
  int splits, k_per_split;
};

inline DownPlan plan_down(int64_t M, int64_t K, int R, int sms) {
  DownPlan p;
  p.rb = rank_block(R);
  p.r_blocks = static_cast<int>(cdiv(R, p.rb));
  p.m_blocks = static_cast<int>(cdiv(M, kSmallRows));
  const int64_t ctas = static_cast<int64_t>(p.m_blocks) * p.r_blocks;
  const int64_t target = 2 * static_cast<int64_t>(sms);
  int splits = 1;
  if (ctas < target) {
    const int64_t by_fill = cdiv(target, ctas);
    const int64_t by_len = imax(1, static_cast<int>(K / (4 * kSmallChunk)));  // >= 4 chunks per split
    splits = static_cast<int>(by_fill < by_len ? by_fill : by_len);
  }
  p.k_per_split = static_cast<int>(round_up(cdiv(K, splits), kSmallChunk));
  p.splits = static_cast<int>(cdiv(K, p.k_per_split));
  if (p.splits < 1) p.splits = 1;
  return p;
}

// Backward kernel 1, dh' = s g_t B_t / (1-p) and dB_t = s g_t^T h_t from one read of g: CTA (i, j) owns rows
// [i*rm, (i+1)*rm) and the j-th block of cn columns of one target. Its dB partial (cn x r) accumulates over
// its rows in registers; its dh partial (64 x r per row sub-block) over its columns. Partials go to
// ws_dh [jb_max][M][R] (when a target spans several column blocks) and ws_db [m_blocks][sum N_t][r] (when
// there are several row blocks), summed in a fixed order by finish_dh / finish_grads.
struct DhDbPlan {
  int rb;              // padded rank r (16, 32, 64, 128)
  int cn;              // columns per CTA: kSmallAccFloats / rb
  int jb[kMaxTargets]; // column blocks of each target
  int jb_total, jb_max;
  int rm, m_blocks;    // rows per CTA, row blocks
};

inline DhDbPlan plan_dh_db(int64_t M, const Slices& sl, int r, int sms) {
  DhDbPlan p;
  p.rb = rank_block(r);
  p.cn = kSmallAccFloats / p.rb;
  p.jb_total = 0;
  p.jb_max = 0;
  for (int t = 0; t < kMaxTargets; ++t) {
    p.jb[t] = t < sl.ntgt ? static_cast<int>(cdiv(sl.cnt[t], p.cn)) : 0;
    p.jb_total += p.jb[t];
    p.jb_max = imax(p.jb_max, p.jb[t]);
  }
  const int64_t sub_blocks = imax(1, static_cast<int>(cdiv(M, kSmallRows)));
  int64_t mb = cdiv(2 * static_cast<int64_t>(sms), imax(1, p.jb_total));
  mb = mb < 1 ? 1 : (mb > sub_blocks ? sub_blocks : mb);
  p.rm = static_cast<int>(round_up(cdiv(M > 0 ? M : 1, mb), kSmallRows));
  p.m_blocks = static_cast<int>(cdiv(M > 0 ? M : 1, p.rm));
  return p;
}

// CTA column block j of the flattened (target, block) list -> target t and the block index inside it.
LF_HD void dh_db_block(const DhDbPlan& p, int j, int& t, int& jt) {
  t = 0;
  while (t < kMaxTargets - 1 && j >= p.jb[t]) {
    j -= p.jb[t];
    ++t;
  }
  jt = j;
}

// Backward kernel 3, dA = dh'^T (mask * x): CTA (i, j, z) owns rows [i*rm, (i+1)*rm), columns [j*ck, (j+1)*ck)
// and rank block z; partials [m_blocks][R][K] summed by finish_grads when m_blocks > 1.
struct DaPlan {
  int rb, r_blocks;
  int ck, k_blocks;
  int rm, m_blocks;
};

inline DaPlan plan_da(int64_t M, int64_t K, int R, int sms) {
  DaPlan p;
  p.rb = rank_block(R);
  p.r_blocks = static_cast<int>(cdiv(R, p.rb));
  p.ck = kSmallAccFloats / p.rb;
  p.k_blocks = static_cast<int>(cdiv(K, p.ck));
  const int64_t ctas = static_cast<int64_t>(p.k_blocks) * p.r_blocks;
  const int64_t sub_blocks = imax(1, static_cast<int>(cdiv(M, kSmallRows)));
  int64_t mb = cdiv(2 * static_cast<int64_t>(sms), ctas);
  mb = mb < 1 ? 1 : (mb > sub_blocks ? sub_blocks : mb);
  p.rm = static_cast<int>(round_up(cdiv(M > 0 ? M : 1, mb), kSmallRows));
  p.m_blocks = static_cast<int>(cdiv(M > 0 ? M : 1, p.rm));
  return p;
}

// ------------------------------------------------------------------------------------------------ accumulators
// Where value i of thread t's accumulator fragment sits in the CTA tile. In both layouts values 2p and 2p+1
// ("pair p") are two adjacent columns of one row, the four lanes of a quad hold the four pairs of one 8-column
// group of that row (lane q: columns 2q, 2q+1), and every pair index maps to the same (row, 8-column group)
// on the four lanes of a quad. The dropout mask relies on exactly this (see lora_philox.cuh).
//
// sm90: wgmma m64n256k16, two consumer warpgroups stacked along M; i = v0 + 2*v1 + 4*v2 (v2 = 8-column block).
struct Sm90Acc {
  static constexpr int kThreads = 256, kValues = 128, kPairs = 64;
  LF_HD static int row(int t, int i) { return 64 * (t / 128) + 16 * ((t % 128) / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2); }
  LF_HD static int col(int t, int i) { return 8 * (i / 4) + 2 * (t % 4) + i % 2; }
};
// sm80: mma.sync m16n8k16, 8 warps as 2 (M) x 4 (N), permutation tile 32 x 64: i = v0 + 2*v1 + 4*mi + 16*ni.
struct Sm80Acc {
  static constexpr int kThreads = 256, kValues = 128, kPairs = 64;
  LF_HD static int row(int t, int i) {
    const int warp = t / 32, lane = t % 32;
    return 16 * (warp % 2) + lane / 4 + 8 * ((i / 2) % 2) + 32 * ((i / 4) % 4);
  }
  LF_HD static int col(int t, int i) {
    const int warp = t / 32, lane = t % 32;
    return 8 * (warp / 2) + 2 * (lane % 4) + i % 2 + 32 * (i / 16);
  }
};

}  // namespace lora_fused
