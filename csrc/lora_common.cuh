// Shared device code: dtype conversion, the counter-based Philox dropout mask, and one generic tiled
// tensor-core GEMM (nvcuda::wmma, fp16/bf16 in, fp32 accumulate) that every LoRA kernel instantiates with its
// own operand loaders and epilogue. Requires sm_80+ (bf16 wmma).
//
// Design rule: correct by construction. Every operand element is fetched through a loader that does its own
// bounds checks (ragged M/N/K are zero-filled), shared-memory tiles have one fixed layout, and the epilogue
// sees fp32 accumulators in shared memory. The only pipelining is a register prefetch of the next slab into a
// second shared-memory stage; no cp.async/TMA/wgmma yet: the simple version first (it cannot be run on the
// development machine), faster mainloops later, measured against it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lora_launch.h"

namespace lora_fused {

// ----------------------------------------------------------------------------------------------- dtypes
template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// ----------------------------------------------------------------------------------------------- Philox
// Philox-4x32-10 (Salmon et al. 2011). The dropout decision of element (row, col) is a pure function of
// (seed, row, col): counter = (col / 8, row, 0, 0), key = (seed_lo, seed_hi); the four 32-bit outputs are cut
// into eight 16-bit draws u_0..u_7 (u_{2i} = low half of word i, u_{2i+1} = high half) for columns
// 8*(col/8) + 0..7. keep = u >= thr with thr = round(p * 65536): p is quantized to 1/65536.
__device__ __forceinline__ uint4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0u, c3 = 0u;
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// Keep bits (bit i: column 8*grp + i is kept) of one row's group of 8 columns. All ones when dropout is off.
__device__ __forceinline__ uint32_t keep8(const Dropout& d, int row, int grp) {
  if (!d.on) return 0xFFu;
  const uint64_t seed = static_cast<uint64_t>(__ldg(d.seed));
  const uint4 w = philox4x32_10(static_cast<uint32_t>(grp), static_cast<uint32_t>(row), static_cast<uint32_t>(seed),
                                static_cast<uint32_t>(seed >> 32));
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  uint32_t bits = 0u;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t u = (words[i >> 1] >> ((i & 1) * 16)) & 0xFFFFu;
    bits |= (u >= d.thr ? 1u : 0u) << i;
  }
  return bits;
}

// ----------------------------------------------------------------------------------------------- loads
// v[i] = row[i0 + i] for lo <= i0 + i < hi, else 0. One 16-byte load when the 8 elements are in range and aligned.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, int i0, int lo, int hi, T (&v)[8]) {
  const T* p = row + i0;
  if (i0 >= lo && i0 + 8 <= hi && (reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const T* qs = reinterpret_cast<const T*>(&q);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = qs[i];
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int j = i0 + i;
    v[i] = (j >= lo && j < hi) ? row[j] : Cvt<T>::from_f(0.f);
  }
}

template <typename T>
__device__ __forceinline__ void zero8(T (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = Cvt<T>::from_f(0.f);
}

template <typename T>
__device__ __forceinline__ void apply_keep8(T (&v)[8], uint32_t bits) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (!((bits >> i) & 1u)) v[i] = Cvt<T>::from_f(0.f);
}

// ----------------------------------------------------------------------------------------------- generic GEMM
// C (BM x BN tile per block) = sum_k A1(m, k) B1(k, n)   [phase 1, k in the problem's range1]
//                        and  sum_j A2(m, j) B2(j, n)    [phase 2, optional, j in range2; a second accumulator]
// then P::epilogue(m, n0, c1[8], c2[8]) for 8 consecutive columns n0..n0+7 of each row.
//
// A problem P provides:
//   using T;  static constexpr bool A1K, B1K, HAS2, A2K, B2K;
//     (xK = the operand is contiguous along the reduction dimension. Loader arguments are (outer, inner0):
//      A with AK: (m, k0);  A without: (k, m0);  B with BK: (n, k0);  B without: (k, n0).
//      Each loader fills 8 consecutive inner elements, zero outside the problem.)
//   a1, b1, a2, b2 loaders; range1(z, lo, hi); range2(n0, lo, hi); epilogue(m, n0, c1, c2).
constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
// Shared-memory tiles keep each operand's global layout (so every thread stores its 8 elements with one 16-byte
// st.shared, no transposition) and the wmma fragment is loaded row- or column-major to match:
constexpr int kLdA = kBK + 8;   // A contiguous along k:  As[m][k], ld 40, matrix_a row_major
constexpr int kLdAT = kBM + 8;  // A contiguous along m:  As[k][m], ld 72, matrix_a col_major
constexpr int kLdB = kBN + 8;   // B contiguous along n:  Bs[k][n], ld 72, matrix_b row_major
constexpr int kLdBT = kBK + 8;  // B contiguous along k:  Bs[n][k], ld 40, matrix_b col_major
constexpr int kLdC = kBN + 4;   // Cs[m][n] fp32 (epilogue)
constexpr int kAElems = kBM * kLdA > kBK * kLdAT ? kBM * kLdA : kBK * kLdAT;
constexpr int kBElems = kBK * kLdB > kBN * kLdBT ? kBK * kLdB : kBN * kLdBT;
template <typename T>
struct GemmSmem {
  static constexpr int kStageElems = kAElems + kBElems;  // one stage: As then Bs (offsets multiples of 128 bytes)
  static constexpr int kOperandBytes = 2 * kStageElems * static_cast<int>(sizeof(T));
  static constexpr int kEpilogueBytes = 2 * kBM * kLdC * static_cast<int>(sizeof(float));
  static constexpr int kBytes = kOperandBytes > kEpilogueBytes ? kOperandBytes : kEpilogueBytes;
};

// Each thread moves exactly two 8-element chunks of each operand per slab (256 chunks, 128 threads): the loads
// of the next slab go to registers (fetch_*) while the tensor cores work on the current one, then to shared
// memory (store_*). Indices: chunk c -> (row, col) of the tile as below, identical in fetch and store.
static_assert(kBM * (kBK / 8) == 2 * kThreads && kBN * (kBK / 8) == 2 * kThreads, "two chunks per thread");

template <bool AK, auto F, typename P>
__device__ __forceinline__ void fetch_a(const P& p, typename P::T (&r)[2][8], int m0, int k0) {
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int c = threadIdx.x + it * kThreads;
    if constexpr (AK) {
      (p.*F)(m0 + c / (kBK / 8), k0 + (c % (kBK / 8)) * 8, r[it]);  // (m, k0..k0+7)
    } else {
      (p.*F)(k0 + c / (kBM / 8), m0 + (c % (kBM / 8)) * 8, r[it]);  // (k, m0..m0+7)
    }
  }
}

template <typename T>
__device__ __forceinline__ void st_shared8(T* dst, const T (&v)[8]) {  // dst is 16-byte aligned (see the lds)
  uint4 q;
  memcpy(&q, v, sizeof(q));
  *reinterpret_cast<uint4*>(dst) = q;
}

template <bool AK, typename T>
__device__ __forceinline__ void store_a(const T (&r)[2][8], T* As) {
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int c = threadIdx.x + it * kThreads;
    if constexpr (AK) {
      st_shared8(As + (c / (kBK / 8)) * kLdA + (c % (kBK / 8)) * 8, r[it]);  // As[m][k0..k0+7]
    } else {
      st_shared8(As + (c / (kBM / 8)) * kLdAT + (c % (kBM / 8)) * 8, r[it]);  // As[k][m0..m0+7]
    }
  }
}

template <bool BK, auto F, typename P>
__device__ __forceinline__ void fetch_b(const P& p, typename P::T (&r)[2][8], int n0, int k0) {
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int c = threadIdx.x + it * kThreads;
    if constexpr (BK) {
      (p.*F)(n0 + c / (kBK / 8), k0 + (c % (kBK / 8)) * 8, r[it]);  // (n, k0..k0+7)
    } else {
      (p.*F)(k0 + c / (kBN / 8), n0 + (c % (kBN / 8)) * 8, r[it]);  // (k, n0..n0+7)
    }
  }
}

template <bool BK, typename T>
__device__ __forceinline__ void store_b(const T (&r)[2][8], T* Bs) {
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int c = threadIdx.x + it * kThreads;
    if constexpr (BK) {
      st_shared8(Bs + (c / (kBK / 8)) * kLdBT + (c % (kBK / 8)) * 8, r[it]);  // Bs[n][k0..k0+7]
    } else {
      st_shared8(Bs + (c / (kBN / 8)) * kLdB + (c % (kBN / 8)) * 8, r[it]);  // Bs[k][n0..n0+7]
    }
  }
}

using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// One BK slab of the 64x64 block tile: 4 warps in a 2x2 grid, each 32x32 = 2x2 fragments.
template <bool AK, bool BK, typename T>
__device__ __forceinline__ void mma_slab(const T* As, const T* Bs, FragC (&acc)[2][2], int wm, int wn) {
  using namespace nvcuda;
  using LA = std::conditional_t<AK, wmma::row_major, wmma::col_major>;
  using LB = std::conditional_t<BK, wmma::col_major, wmma::row_major>;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = wm * 32 + i * 16;  // element (m, k) at As[m*kLdA + k] (row_major) or As[k*kLdAT + m] (col_major)
      wmma::load_matrix_sync(a[i], AK ? As + m * kLdA + kk : As + kk * kLdAT + m, AK ? kLdA : kLdAT);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int n = wn * 32 + j * 16;  // element (k, n) at Bs[n*kLdBT + k] (col_major) or Bs[k*kLdB + n] (row_major)
      wmma::load_matrix_sync(b[j], BK ? Bs + n * kLdBT + kk : Bs + kk * kLdB + n, BK ? kLdBT : kLdB);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

// One reduction over [lo, hi) in BK slabs into acc. Two shared-memory stages and one barrier per slab: stage
// b is rewritten two slabs later, after a barrier that every warp passes only when done reading it. Ends on a
// barrier, so the caller may reuse shared memory.
template <bool AK, bool BK, auto FA, auto FB, typename P>
__device__ __forceinline__ void mainloop(const P& p, typename P::T* stages, int m0, int n0, int lo, int hi,
                                         FragC (&acc)[2][2], int wm, int wn) {
  using T = typename P::T;
  if (lo >= hi) return;
  T ra[2][8], rb[2][8];
  fetch_a<AK, FA>(p, ra, m0, lo);
  fetch_b<BK, FB>(p, rb, n0, lo);
  int buf = 0;
  for (int k0 = lo; k0 < hi; k0 += kBK) {
    T* As = stages + buf * GemmSmem<T>::kStageElems;
    T* Bs = As + kAElems;
    store_a<AK>(ra, As);
    store_b<BK>(rb, Bs);
    __syncthreads();
    if (k0 + kBK < hi) {  // next slab's global loads in flight during this slab's MMAs
      fetch_a<AK, FA>(p, ra, m0, k0 + kBK);
      fetch_b<BK, FB>(p, rb, n0, k0 + kBK);
    }
    mma_slab<AK, BK, T>(As, Bs, acc, wm, wn);
    buf ^= 1;
  }
  __syncthreads();
}

// grid: (ceil(Mtile/BM), ceil(Ntile/BN), splits); block: 128 threads.
template <typename P>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const P p) {
  using T = typename P::T;
  __shared__ __align__(128) unsigned char smem[GemmSmem<T>::kBytes];
  T* stages = reinterpret_cast<T*>(smem);

  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int warp = threadIdx.x / 32, wm = warp >> 1, wn = warp & 1;

  FragC acc1[2][2], acc2[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      nvcuda::wmma::fill_fragment(acc1[i][j], 0.f);
      nvcuda::wmma::fill_fragment(acc2[i][j], 0.f);
    }

  int lo = 0, hi = 0;
  p.range1(blockIdx.z, lo, hi);
  mainloop<P::A1K, P::B1K, &P::a1, &P::b1>(p, stages, m0, n0, lo, hi, acc1, wm, wn);
  if constexpr (P::HAS2) {
    p.range2(n0, lo, hi);
    mainloop<P::A2K, P::B2K, &P::a2, &P::b2>(p, stages, m0, n0, lo, hi, acc2, wm, wn);
  }

  // Epilogue through shared memory (free: each mainloop ended on a barrier).
  float* C1 = reinterpret_cast<float*>(smem);
  float* C2 = C1 + kBM * kLdC;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int off = (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16;
      nvcuda::wmma::store_matrix_sync(C1 + off, acc1[i][j], kLdC, nvcuda::wmma::mem_row_major);
      if constexpr (P::HAS2) nvcuda::wmma::store_matrix_sync(C2 + off, acc2[i][j], kLdC, nvcuda::wmma::mem_row_major);
    }
  __syncthreads();
  for (int c = threadIdx.x; c < kBM * (kBN / 8); c += kThreads) {
    const int row = c / (kBN / 8), nc = (c % (kBN / 8)) * 8;
    p.epilogue(m0 + row, n0 + nc, C1 + row * kLdC + nc, C2 + row * kLdC + nc);
  }
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace lora_fused
