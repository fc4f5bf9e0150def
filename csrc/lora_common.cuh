// Shared device code: dtype conversion, the counter-based Philox dropout mask, and one generic tiled
// tensor-core GEMM (nvcuda::wmma, fp16/bf16 in, fp32 accumulate) that every LoRA kernel instantiates with its
// own operand loaders and epilogue. Requires sm_80+ (bf16 wmma).
//
// Design rule: correct by construction. Every operand element is fetched through a loader that does its own
// bounds checks (ragged M/N/K are zero-filled), shared-memory tiles have one fixed layout, and the epilogue
// sees fp32 accumulators in shared memory. No asynchronous copies, no double buffering: the simple version
// first (it cannot be run on the development machine), faster mainloops later, measured against it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

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
constexpr int kLdA = kBK + 8;  // As[BM][kLdA]   (m, k)
constexpr int kLdB = kBN + 8;  // Bs[BK][kLdB]   (k, n)
constexpr int kLdC = kBN + 4;  // Cs[BM][kLdC]   fp32
template <typename T>
struct GemmSmem {
  static constexpr int kOperandBytes = (kBM * kLdA + kBK * kLdB) * static_cast<int>(sizeof(T));
  static constexpr int kEpilogueBytes = 2 * kBM * kLdC * static_cast<int>(sizeof(float));
  static constexpr int kBytes = kOperandBytes > kEpilogueBytes ? kOperandBytes : kEpilogueBytes;
};

template <bool AK, auto F, typename P>
__device__ __forceinline__ void load_a_tile(const P& p, typename P::T* As, int m0, int k0) {
  using T = typename P::T;
  const int tid = threadIdx.x;
  if constexpr (AK) {
    for (int c = tid; c < kBM * (kBK / 8); c += kThreads) {
      const int row = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
      T v[8];
      (p.*F)(m0 + row, k0 + kc, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) As[row * kLdA + kc + i] = v[i];
    }
  } else {
    for (int c = tid; c < kBK * (kBM / 8); c += kThreads) {
      const int kk = c / (kBM / 8), mc = (c % (kBM / 8)) * 8;
      T v[8];
      (p.*F)(k0 + kk, m0 + mc, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) As[(mc + i) * kLdA + kk] = v[i];
    }
  }
}

template <bool BK, auto F, typename P>
__device__ __forceinline__ void load_b_tile(const P& p, typename P::T* Bs, int n0, int k0) {
  using T = typename P::T;
  const int tid = threadIdx.x;
  if constexpr (BK) {
    for (int c = tid; c < kBN * (kBK / 8); c += kThreads) {
      const int n = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
      T v[8];
      (p.*F)(n0 + n, k0 + kc, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) Bs[(kc + i) * kLdB + n] = v[i];
    }
  } else {
    for (int c = tid; c < kBK * (kBN / 8); c += kThreads) {
      const int kk = c / (kBN / 8), nc = (c % (kBN / 8)) * 8;
      T v[8];
      (p.*F)(k0 + kk, n0 + nc, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) Bs[kk * kLdB + nc + i] = v[i];
    }
  }
}

template <typename T>
using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
template <typename T>
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// One BK slab of the 64x64 block tile: 4 warps in a 2x2 grid, each 32x32 = 2x2 fragments.
template <typename T>
__device__ __forceinline__ void mma_slab(const T* As, const T* Bs, FragC (&acc)[2][2], int wm, int wn) {
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    FragA<T> a[2];
    FragB<T> b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * kLdA + kk, kLdA);
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(b[j], Bs + kk * kLdB + wn * 32 + j * 16, kLdB);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

// grid: (ceil(Mtile/BM), ceil(Ntile/BN), splits); block: 128 threads.
template <typename P>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const P p) {
  using T = typename P::T;
  __shared__ __align__(128) unsigned char smem[GemmSmem<T>::kBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + kBM * kLdA;

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
  for (int k0 = lo; k0 < hi; k0 += kBK) {
    load_a_tile<P::A1K, &P::a1>(p, As, m0, k0);
    load_b_tile<P::B1K, &P::b1>(p, Bs, n0, k0);
    __syncthreads();
    mma_slab<T>(As, Bs, acc1, wm, wn);
    __syncthreads();
  }
  if constexpr (P::HAS2) {
    p.range2(n0, lo, hi);
    for (int k0 = lo; k0 < hi; k0 += kBK) {
      load_a_tile<P::A2K, &P::a2>(p, As, m0, k0);
      load_b_tile<P::B2K, &P::b2>(p, Bs, n0, k0);
      __syncthreads();
      mma_slab<T>(As, Bs, acc2, wm, wn);
      __syncthreads();
    }
  }

  // Epilogue through shared memory (the operand tiles are dead: the loop ended on a barrier).
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
