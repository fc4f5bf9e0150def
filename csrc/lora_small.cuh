// The three memory-bound kernels of the LoRA linear and their fixed-order reductions, for every arch >= sm_80:
//   down   h   = x_hat A^T                    (forward; streams x once)
//   dh_db  dh' = s g_t B_t / (1-p),  dB_t = s g_t^T h_t   (backward; streams g once)
//   da     dA  = dh'^T (mask * x)             (backward; streams x once)
// Each streams its big operand in 64 x 64 chunks with 16-byte cp.async into a 3-stage shared-memory ring,
// applies the dropout mask in shared memory (one Philox call per 8 elements, per thread on its own vectors),
// and multiplies on the tensor cores (wmma 16x16x16, fp32 accumulation) against a rank block of RB columns.
// Grids are planned to fill the GPU (lora_plan.h); reductions across CTAs write fp32 partials that a second,
// tiny kernel sums in a fixed order: no atomics, so dA and dB are bitwise reproducible run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "lora_launch.h"
#include "lora_philox.cuh"
#include "lora_plan.h"

namespace lora_fused {
namespace small {

constexpr int kThreads = 128;  // 4 warps
constexpr int kStages = 3;
constexpr int kLd = kSmallChunk + 8;  // 72 elements: 144-byte rows, 16-byte aligned, spread over the banks

template <DType D>
using Native = std::conditional_t<D == DType::kHalf, __half, __nv_bfloat16>;

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16-byte global -> shared copy; pred == false zero-fills the destination without reading the source.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Zero the dropped elements of 8 consecutive shared-memory values (bits: keep mask of the 8 columns).
template <typename T>
__device__ __forceinline__ void mask8_smem(T* p, uint32_t bits) {
  if (bits == 0xFFu) return;
  uint4 q = *reinterpret_cast<uint4*>(p);
  uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = (bits >> (2 * i)) & 1u ? 0x0000FFFFu : 0u;
    const uint32_t hi = (bits >> (2 * i + 1)) & 1u ? 0xFFFF0000u : 0u;
    w[i] &= lo | hi;
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

template <int N>
__device__ __forceinline__ void zero_frags(FragAcc (&f)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) nvcuda::wmma::fill_fragment(f[j], 0.f);
}
template <int N1, int N2>
__device__ __forceinline__ void zero_frags(FragAcc (&f)[N1][N2]) {
#pragma unroll
  for (int i = 0; i < N1; ++i) zero_frags(f[i]);
}

// Issues the first kStages - 1 chunk loads (one cp.async group each, empty past n_chunks).
template <class Load>
__device__ __forceinline__ void pipeline_prologue(Load& load, int n_chunks) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_chunks) load(s, s);
    cp_async_commit();
  }
}

// Loads 64 rows x 64 columns of a row-major matrix into a kLd-strided smem chunk: 4 vectors of 8 per thread.
// Rows >= row_end or columns >= col_end are zero. vec: rows are 16-byte aligned and col0 % 8 == 0, so each
// vector is one cp.async (col_end is then a multiple of 8 or the vector is partly outside: see `exact`);
// otherwise element loads (the slow path for unaligned slices).
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* base, int64_t ld, int row0, int row_end, int col0,
                                           int col_end, bool vec) {
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int v = static_cast<int>(threadIdx.x) + kThreads * it;
    const int r = v >> 3, cv = v & 7;
    const int row = row0 + r, col = col0 + 8 * cv;
    T* d = dst + r * kLd + 8 * cv;
    if (vec) {
      const bool ok = row < row_end && col < col_end;
      cp_async16(d, ok ? base + static_cast<int64_t>(row) * ld + col : base, ok);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool ok = row < row_end && col + e < col_end;
        d[e] = ok ? base[static_cast<int64_t>(row) * ld + col + e] : from_f<T>(0.f);
      }
    }
  }
}

// Applies the dropout mask to the vectors this thread loaded with load_chunk (same indexing).
template <typename T>
__device__ __forceinline__ void mask_chunk(T* dst, int row0, int row_end, int col0, int col_end, uint64_t seed,
                                           uint32_t thr) {
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int v = static_cast<int>(threadIdx.x) + kThreads * it;
    const int r = v >> 3, cv = v & 7;
    const int row = row0 + r, col = col0 + 8 * cv;
    if (row < row_end && col < col_end) mask8_smem(dst + r * kLd + 8 * cv, keep8(seed, thr, row, col >> 3));
  }
}

// Writes one 16x16 fp32 fragment through a per-warp scratch tile: f(rr, cc, value) for each element.
template <typename F>
__device__ __forceinline__ void for_each_frag(const FragAcc& frag, float* scratch, F&& f) {
  nvcuda::wmma::store_matrix_sync(scratch, frag, 16, nvcuda::wmma::mem_row_major);
  __syncwarp();
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int idx = lane * 8 + e;
    f(idx / 16, idx % 16, scratch[idx]);
  }
  __syncwarp();
}

// ------------------------------------------------------------------------------------------------ down
template <typename T>
struct DownParams {
  const T* x;
  int64_t ldx;
  const T* A;  // (R x K), contiguous
  T* h;
  int64_t ldh;
  T* h_pad;  // may be null
  int64_t ldh_pad;
  float* ws;  // [splits][M][R] when splits > 1
  int M, K, R, k_per_split, splits;
  Dropout drop;
};

template <int RB>
struct DownSmem {
  static constexpr int kBytes = kStages * (kSmallRows + RB) * kLd * 2 + 4 * 256 * 4;
};

// grid (m_blocks, r_blocks, splits), 128 threads.
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads, 1) down_kernel(const DownParams<T> p) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  T* X = reinterpret_cast<T*>(smem);
  T* Ab = X + kStages * kSmallRows * kLd;
  float* scratch = reinterpret_cast<float*>(Ab + kStages * RB * kLd) + (threadIdx.x / 32) * 256;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int m0 = static_cast<int>(blockIdx.x) * kSmallRows, j0 = static_cast<int>(blockIdx.y) * RB;
  const int split = static_cast<int>(blockIdx.z);
  const int kbeg = split * p.k_per_split, kend = imin(p.K, kbeg + p.k_per_split);
  const int nch = static_cast<int>(cdiv(kend - kbeg, kSmallChunk));
  const uint64_t seed = load_seed(p.drop);

  auto load = [&](int c, int st) {
    const int k0 = kbeg + kSmallChunk * c;
    load_chunk(X + st * kSmallRows * kLd, p.x, p.ldx, m0, p.M, k0, kend, true);
    for (int v = static_cast<int>(threadIdx.x); v < RB * 8; v += kThreads) {
      const int jr = v >> 3, cv = v & 7, j = j0 + jr, col = k0 + 8 * cv;
      const bool ok = j < p.R && col < kend;
      cp_async16(Ab + st * RB * kLd + jr * kLd + 8 * cv, ok ? p.A + static_cast<int64_t>(j) * p.K + col : p.A, ok);
    }
  };

  FragAcc acc[RB / 16];
  zero_frags(acc);
  pipeline_prologue(load, nch);
  for (int c = 0; c < nch; ++c) {
    cp_async_wait<kStages - 2>();
    const int st = c % kStages;
    T* Xs = X + st * kSmallRows * kLd;
    if (p.drop.on) mask_chunk(Xs, m0, p.M, kbeg + kSmallChunk * c, kend, seed, p.drop.thr);
    __syncthreads();
    if (c + kStages - 1 < nch) load(c + kStages - 1, (c + kStages - 1) % kStages);
    cp_async_commit();
    const T* As = Ab + st * RB * kLd;
#pragma unroll
    for (int kk = 0; kk < kSmallChunk / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, Xs + warp * 16 * kLd + kk * 16, kLd);
#pragma unroll
      for (int j = 0; j < RB / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // (k, j) at As[j * kLd + k]
        wmma::load_matrix_sync(b, As + j * 16 * kLd + kk * 16, kLd);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
  }
  cp_async_wait<0>();

  const float scale = p.drop.on ? p.drop.inv : 1.f;
  const int R8 = padded_rank_cols(p.R);
#pragma unroll
  for (int j = 0; j < RB / 16; ++j) {
    for_each_frag(acc[j], scratch, [&](int rr, int cc, float v) {
      const int row = m0 + warp * 16 + rr, col = j0 + j * 16 + cc;
      if (row >= p.M) return;
      if (p.splits > 1) {
        if (col < p.R) p.ws[(static_cast<int64_t>(split) * p.M + row) * p.R + col] = v;
      } else if (col < p.R) {
        const T t = from_f<T>(v * scale);
        p.h[static_cast<int64_t>(row) * p.ldh + col] = t;
        if (p.h_pad != nullptr) p.h_pad[static_cast<int64_t>(row) * p.ldh_pad + col] = t;
      } else if (col < R8 && p.h_pad != nullptr) {
        p.h_pad[static_cast<int64_t>(row) * p.ldh_pad + col] = from_f<T>(0.f);
      }
    });
  }
}

// h = inv * sum_s ws[s] (fixed order), into h and h_pad (its padding columns zero).
template <typename T>
__global__ void finish_h_kernel(const DownParams<T> p) {
  const int R8 = padded_rank_cols(p.R);
  const int64_t n = static_cast<int64_t>(p.M) * R8;
  const float scale = p.drop.on ? p.drop.inv : 1.f;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / R8;
    const int col = static_cast<int>(e % R8);
    if (col < p.R) {
      float acc = 0.f;
      for (int s = 0; s < p.splits; ++s) acc += p.ws[(s * static_cast<int64_t>(p.M) + row) * p.R + col];
      const T t = from_f<T>(acc * scale);
      p.h[row * p.ldh + col] = t;
      if (p.h_pad != nullptr) p.h_pad[row * p.ldh_pad + col] = t;
    } else if (p.h_pad != nullptr) {
      p.h_pad[row * p.ldh_pad + col] = from_f<T>(0.f);
    }
  }
}

// ------------------------------------------------------------------------------------------------ dh / dB
template <typename T>
struct DhDbParams {
  const T* g;
  int64_t ldg;
  const T* h;  // (M x R)
  int64_t ldh;
  const T* B;  // (sum N_t x r), contiguous
  T* dh;       // (M x lddh): dh' = s * inv * g_t B_t in columns t*r.., zero in R..lddh
  int64_t lddh;
  T* dB;  // (sum N_t x r)
  float* ws_dh;
  float* ws_db;
  int M, R, r, NB;  // NB = sum N_t
  Slices sl;
  DhDbPlan plan;
  float s, inv;
  bool need_dh, need_db, vec;
};

template <int RB>
struct DhDbShape {
  static constexpr int kCN = kSmallAccFloats / RB;  // columns per CTA
  static constexpr int kNCH = kCN / kSmallChunk;      // 64-column chunks per CTA
  static constexpr int kLdR = RB + 8;
  static constexpr int kBytes =
      (kCN * kLdR + 2 * kSmallRows * kLdR + kStages * kSmallRows * kLd) * 2 + 4 * 256 * 4;
};

// grid (m_blocks, jb_total), 128 threads. Warp w: rows 16w.. of a 64-row sub-block for dh, columns 16w.. of
// each 64-column chunk for dB.
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads) dh_db_kernel(const DhDbParams<T> p) {
  using namespace nvcuda;
  using S = DhDbShape<RB>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Bs = reinterpret_cast<T*>(smem);         // [kCN][kLdR]   this CTA's rows of B_t
  T* Hs = Bs + S::kCN * S::kLdR;              // [2][64][kLdR] h_t of the current row sub-block (double-buffered)
  T* Gs = Hs + 2 * kSmallRows * S::kLdR;      // [kStages][64][kLd]
  float* scratch = reinterpret_cast<float*>(Gs + kStages * kSmallRows * kLd) + (threadIdx.x / 32) * 256;
  const int warp = static_cast<int>(threadIdx.x) / 32;

  int t = 0, jt = 0;
  dh_db_block(p.plan, static_cast<int>(blockIdx.y), t, jt);
  const int off = p.sl.off[t], boff = p.sl.boff[t];
  const int c0 = jt * S::kCN, c1 = imin(p.sl.cnt[t], c0 + S::kCN);
  const int r0 = static_cast<int>(blockIdx.x) * p.plan.rm, r1 = imin(p.M, r0 + p.plan.rm);
  const int n_rs = static_cast<int>(cdiv(r1 - r0, kSmallRows));
  const T zero = from_f<T>(0.f);

  for (int e = static_cast<int>(threadIdx.x); e < S::kCN * RB; e += kThreads) {
    const int cc = e / RB, jj = e % RB;
    Bs[cc * S::kLdR + jj] = (c0 + cc < c1 && jj < p.r) ? p.B[static_cast<int64_t>(boff + c0 + cc) * p.r + jj] : zero;
  }

  auto load = [&](int it, int st) {
    const int rs = it / S::kNCH, ch = it % S::kNCH;
    load_chunk(Gs + st * kSmallRows * kLd, p.g + off, p.ldg, r0 + rs * kSmallRows, r1, c0 + ch * kSmallChunk, c1,
               p.vec);
  };
  const int n_it = n_rs * S::kNCH;
  pipeline_prologue(load, n_it);

  FragAcc dacc[RB / 16];
  FragAcc bacc[S::kNCH][RB / 16];
  zero_frags(bacc);

  for (int rs = 0; rs < n_rs; ++rs) {
    const int row0 = r0 + rs * kSmallRows;
    T* H = Hs + (rs & 1) * kSmallRows * S::kLdR;
    zero_frags(dacc);
#pragma unroll
    for (int ch = 0; ch < S::kNCH; ++ch) {
      const int it = rs * S::kNCH + ch;
      cp_async_wait<kStages - 2>();
      if (ch == 0 && p.need_db) {
        for (int e = static_cast<int>(threadIdx.x); e < kSmallRows * RB; e += kThreads) {
          const int rr = e / RB, jj = e % RB;
          H[rr * S::kLdR + jj] =
              (row0 + rr < r1 && jj < p.r) ? p.h[static_cast<int64_t>(row0 + rr) * p.ldh + t * p.r + jj] : zero;
        }
      }
      __syncthreads();
      if (it + kStages - 1 < n_it) load(it + kStages - 1, (it + kStages - 1) % kStages);
      cp_async_commit();
      const T* G = Gs + (it % kStages) * kSmallRows * kLd;
#pragma unroll
      for (int kk = 0; kk < kSmallChunk / 16; ++kk) {
        if (p.need_dh) {  // dh (64 x RB) += G (64 x 64) . B chunk (64 x RB)
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::load_matrix_sync(a, G + warp * 16 * kLd + kk * 16, kLd);
#pragma unroll
          for (int j = 0; j < RB / 16; ++j) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
            wmma::load_matrix_sync(b, Bs + (ch * kSmallChunk + kk * 16) * S::kLdR + j * 16, S::kLdR);
            wmma::mma_sync(dacc[j], a, b, dacc[j]);
          }
        }
        if (p.need_db) {  // dB chunk (64 x RB) += G^T (64 x 64 rows) . H (64 x RB)
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;  // (col, row) at G[row * kLd + col]
          wmma::load_matrix_sync(a, G + kk * 16 * kLd + warp * 16, kLd);
#pragma unroll
          for (int j = 0; j < RB / 16; ++j) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
            wmma::load_matrix_sync(b, H + kk * 16 * S::kLdR + j * 16, S::kLdR);
            wmma::mma_sync(bacc[ch][j], a, b, bacc[ch][j]);
          }
        }
      }
    }
    if (p.need_dh) {
      const bool direct = p.plan.jb[t] == 1;
#pragma unroll
      for (int j = 0; j < RB / 16; ++j) {
        for_each_frag(dacc[j], scratch, [&](int rr, int cc, float v) {
          const int row = row0 + warp * 16 + rr, col = j * 16 + cc;
          if (row >= r1 || col >= p.r) return;
          if (direct) {
            p.dh[static_cast<int64_t>(row) * p.lddh + t * p.r + col] = from_f<T>(v * p.s * p.inv);
          } else {
            p.ws_dh[(static_cast<int64_t>(jt) * p.M + row) * p.R + t * p.r + col] = v;
          }
        });
      }
      if (blockIdx.y == 0) {  // one CTA per row block zeroes the padding columns of dh'
        const int pad = static_cast<int>(p.lddh) - p.R;
        for (int e = static_cast<int>(threadIdx.x); e < kSmallRows * pad; e += kThreads) {
          const int row = row0 + e / pad;
          if (row < r1) p.dh[static_cast<int64_t>(row) * p.lddh + p.R + e % pad] = zero;
        }
      }
    }
  }
  cp_async_wait<0>();

  if (p.need_db) {
    const bool direct = p.plan.m_blocks == 1;
#pragma unroll
    for (int c = 0; c < S::kNCH; ++c) {
#pragma unroll
      for (int j = 0; j < RB / 16; ++j) {
        for_each_frag(bacc[c][j], scratch, [&](int rr, int cc, float v) {
          const int col = c0 + c * kSmallChunk + warp * 16 + rr, rc = j * 16 + cc;
          if (col >= c1 || rc >= p.r) return;
          const int64_t b = boff + col;
          if (direct) {
            p.dB[b * p.r + rc] = from_f<T>(v * p.s);
          } else {
            p.ws_db[(static_cast<int64_t>(blockIdx.x) * p.NB + b) * p.r + rc] = v;
          }
        });
      }
    }
  }
}

// dh' of targets split over several column blocks: s * inv * sum_jt ws_dh[jt] (fixed order).
template <typename T>
__global__ void finish_dh_kernel(const DhDbParams<T> p) {
  const int64_t n = static_cast<int64_t>(p.M) * p.R;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / p.R;
    const int col = static_cast<int>(e % p.R), t = col / p.r;
    const int nb = p.plan.jb[t];
    if (nb <= 1) continue;
    float acc = 0.f;
    for (int jt = 0; jt < nb; ++jt) acc += p.ws_dh[(jt * static_cast<int64_t>(p.M) + row) * p.R + col];
    p.dh[row * p.lddh + col] = from_f<T>(acc * p.s * p.inv);
  }
}

// ------------------------------------------------------------------------------------------------ dA
template <typename T>
struct DaParams {
  const T* dh;  // (M x lddh), dh' = dh / (1-p)
  int64_t lddh;
  const T* x;
  int64_t ldx;
  T* dA;  // (R x K)
  float* ws;  // [m_blocks][R][K]
  int M, K, R;
  DaPlan plan;
  Dropout drop;
};

template <int RB>
struct DaShape {
  static constexpr int kCK = kSmallAccFloats / RB;
  static constexpr int kNCH = kCK / kSmallChunk;
  static constexpr int kLdR = RB + 8;
  static constexpr int kBytes = (2 * kSmallRows * kLdR + kStages * kSmallRows * kLd) * 2 + 4 * 256 * 4;
};

// grid (m_blocks, k_blocks, r_blocks), 128 threads. Warp w: columns 16w.. of each 64-column chunk.
template <typename T, int RB>
__global__ void __launch_bounds__(kThreads) da_kernel(const DaParams<T> p) {
  using namespace nvcuda;
  using S = DaShape<RB>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ds = reinterpret_cast<T*>(smem);          // [2][64][kLdR] dh' rows of the current sub-block
  T* Xs = Ds + 2 * kSmallRows * S::kLdR;       // [kStages][64][kLd]
  float* scratch = reinterpret_cast<float*>(Xs + kStages * kSmallRows * kLd) + (threadIdx.x / 32) * 256;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int r0 = static_cast<int>(blockIdx.x) * p.plan.rm, r1 = imin(p.M, r0 + p.plan.rm);
  const int k0 = static_cast<int>(blockIdx.y) * S::kCK, k1 = imin(p.K, k0 + S::kCK);
  const int j0 = static_cast<int>(blockIdx.z) * RB;
  const int n_rs = static_cast<int>(cdiv(r1 - r0, kSmallRows));
  const uint64_t seed = load_seed(p.drop);
  const T zero = from_f<T>(0.f);

  auto load = [&](int it, int st) {
    const int rs = it / S::kNCH, ch = it % S::kNCH;
    load_chunk(Xs + st * kSmallRows * kLd, p.x, p.ldx, r0 + rs * kSmallRows, r1, k0 + ch * kSmallChunk, k1, true);
  };
  const int n_it = n_rs * S::kNCH;
  pipeline_prologue(load, n_it);

  FragAcc acc[S::kNCH][RB / 16];
  zero_frags(acc);

  for (int rs = 0; rs < n_rs; ++rs) {
    const int row0 = r0 + rs * kSmallRows;
    T* D = Ds + (rs & 1) * kSmallRows * S::kLdR;
#pragma unroll
    for (int ch = 0; ch < S::kNCH; ++ch) {
      const int it = rs * S::kNCH + ch;
      cp_async_wait<kStages - 2>();
      T* X = Xs + (it % kStages) * kSmallRows * kLd;
      if (p.drop.on) mask_chunk(X, row0, r1, k0 + ch * kSmallChunk, k1, seed, p.drop.thr);
      if (ch == 0) {
        for (int e = static_cast<int>(threadIdx.x); e < kSmallRows * RB; e += kThreads) {
          const int rr = e / RB, jj = e % RB;
          D[rr * S::kLdR + jj] =
              (row0 + rr < r1 && j0 + jj < p.R) ? p.dh[static_cast<int64_t>(row0 + rr) * p.lddh + j0 + jj] : zero;
        }
      }
      __syncthreads();
      if (it + kStages - 1 < n_it) load(it + kStages - 1, (it + kStages - 1) % kStages);
      cp_async_commit();
#pragma unroll
      for (int kk = 0; kk < kSmallChunk / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;  // x_hat rows kk*16.., columns 16w..
        wmma::load_matrix_sync(b, X + kk * 16 * kLd + warp * 16, kLd);
#pragma unroll
        for (int j = 0; j < RB / 16; ++j) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;  // (j, m) at D[m * kLdR + j]
          wmma::load_matrix_sync(a, D + kk * 16 * S::kLdR + j * 16, S::kLdR);
          wmma::mma_sync(acc[ch][j], a, b, acc[ch][j]);
        }
      }
    }
  }
  cp_async_wait<0>();

  const bool direct = p.plan.m_blocks == 1;
#pragma unroll
  for (int c = 0; c < S::kNCH; ++c) {
#pragma unroll
    for (int j = 0; j < RB / 16; ++j) {
      for_each_frag(acc[c][j], scratch, [&](int rr, int cc, float v) {
        const int jr = j0 + j * 16 + rr, col = k0 + c * kSmallChunk + warp * 16 + cc;
        if (jr >= p.R || col >= k1) return;
        if (direct) {
          p.dA[static_cast<int64_t>(jr) * p.K + col] = from_f<T>(v);
        } else {
          p.ws[(static_cast<int64_t>(blockIdx.x) * p.R + jr) * p.K + col] = v;
        }
      });
    }
  }
}

// dB = s * sum_i ws_db[i] and dA = sum_i ws_da[i] (fixed order), whichever was split.
template <typename T>
struct FinishParams {
  const float* ws_db;
  T* dB;
  int64_t n_db;
  int mb_db;
  float s;
  const float* ws_da;
  T* dA;
  int64_t n_da;
  int mb_da;
};

template <typename T>
__global__ void finish_grads_kernel(const FinishParams<T> p) {
  const int64_t n = p.n_db + p.n_da;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (e < p.n_db) {
      float acc = 0.f;
      for (int i = 0; i < p.mb_db; ++i) acc += p.ws_db[i * p.n_db + e];
      p.dB[e] = from_f<T>(acc * p.s);
    } else {
      const int64_t f = e - p.n_db;
      float acc = 0.f;
      for (int i = 0; i < p.mb_da; ++i) acc += p.ws_da[i * p.n_da + f];
      p.dA[f] = from_f<T>(acc);
    }
  }
}

// Grid of a grid-stride elementwise kernel over n elements.
inline int elementwise_blocks(int64_t n) {
  const int64_t b = cdiv(n > 0 ? n : 1, 256);
  return static_cast<int>(b < 4096 ? b : 4096);
}

}  // namespace small
}  // namespace lora_fused
