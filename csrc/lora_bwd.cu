// Backward of the LoRA linear (see shared/design/KERNELS.md), the mask regenerated from the seed:
//   kernel 1: dh = s * g_t B_t and dB += g_t^T h_t from ONE read of the targeted columns of g
//             (dB reduced over row blocks with fp32 atomics into a zeroed workspace)
//   kernel 2: dx = g W + keep * (dh A) / (1-p): dh A is a second reduction into a second accumulator of the same
//             tile, masked in the epilogue (the mask regenerated for the tile)
//   kernel 3: dA += dh^T (keep * x): x read once, the mask applied at load (dropout(x) never materialized);
//             split over M for parallelism, fp32 atomics into a zeroed workspace
#include "lora_common.cuh"

namespace lora_fused {
namespace {

// ------------------------------------------------------------------------------------------ kernel 1: dh, dB
// A block owns BM rows of g and walks the targeted columns in steps of 32. Two shapes: BM = 128 rows for
// r <= 32 (the common ranks; 4x fewer dB atomics) and BM = 32 rows for r <= 128. Per block: dh (BM x r)
// in registers, 16 tiles of 16x16 at most over 4 warps; the dB chunk (32 x r) through shared memory to atomics.
constexpr int kDhBN = 32;            // columns of g per step
constexpr int kDhLdG = kDhBN + 8;    // Gs[BM][40]
constexpr int kDhTilesPerWarp = 4;   // (BM/16) * (RMAX/16) = 16 tiles over 4 warps in both shapes

template <typename T, int BM, int RMAX>
__global__ void __launch_bounds__(kThreads)
    dh_db_kernel(const T* __restrict__ g, const T* __restrict__ h, const T* __restrict__ B, T* __restrict__ dh,
                 float* __restrict__ dB32, int M, int N, int r, Slices sl, float s) {
  using namespace nvcuda;
  constexpr int kDhBM = BM;
  constexpr int kDhLdH = RMAX + 8;  // Hs[BM][RMAX+8], Bs[32][RMAX+8] (input dtype)
  constexpr int kDhLdC = RMAX + 4;  // Cs[BM][RMAX+4] fp32
  constexpr int kTm = BM / 16;      // 16-row tiles of the block
  static_assert(kTm * (RMAX / 16) <= 4 * kDhTilesPerWarp, "dh tiles must fit the per-warp fragments");
  __shared__ __align__(128) T Hs[kDhBM * kDhLdH];
  __shared__ __align__(128) T Bs[kDhBN * kDhLdH];
  __shared__ __align__(128) T Gs[kDhBM * kDhLdG];
  __shared__ __align__(128) float Cs[kDhBM * kDhLdC];

  const int R = sl.ntgt * r;
  const int m0 = blockIdx.x * kDhBM;
  const int tid = threadIdx.x, warp = tid / 32;
  const int rp = (r + 15) / 16 * 16;   // rank padded to the MMA tile
  const int ntiles = kTm * (rp / 16);  // 16x16 tiles of the BM x rp dh block
  const int ntiles_db = 2 * (rp / 16);  // 16x16 tiles of the 32 x rp dB chunk
  const T zero = Cvt<T>::from_f(0.f);

  for (int t = 0; t < sl.ntgt; ++t) {
    const int off = sl.off[t], cnt = sl.cnt[t], boff = sl.boff[t];
    // h_t rows of this block (zero padded)
    for (int e = tid; e < kDhBM * rp; e += kThreads) {
      const int m = e / rp, j = e % rp;
      Hs[m * kDhLdH + j] = (m0 + m < M && j < r) ? h[static_cast<int64_t>(m0 + m) * R + t * r + j] : zero;
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dacc[kDhTilesPerWarp];
#pragma unroll
    for (int i = 0; i < kDhTilesPerWarp; ++i) wmma::fill_fragment(dacc[i], 0.f);

    for (int nb = 0; nb < cnt; nb += kDhBN) {
      for (int e = tid; e < kDhBM * kDhBN; e += kThreads) {
        const int m = e / kDhBN, nn = e % kDhBN;
        Gs[m * kDhLdG + nn] =
            (m0 + m < M && nb + nn < cnt) ? g[static_cast<int64_t>(m0 + m) * N + off + nb + nn] : zero;
      }
      for (int e = tid; e < kDhBN * rp; e += kThreads) {
        const int nn = e / rp, j = e % rp;
        Bs[nn * kDhLdH + j] = (nb + nn < cnt && j < r) ? B[static_cast<int64_t>(boff + nb + nn) * r + j] : zero;
      }
      __syncthreads();
      // dh (BM x rp) += G (BM x 32) . B_t chunk (32 x rp)
#pragma unroll
      for (int i = 0; i < kDhTilesPerWarp; ++i) {
        const int tile = warp + 4 * i;
        if (tile < ntiles) {
          const int tm = tile % kTm, tj = tile / kTm;
#pragma unroll
          for (int kk = 0; kk < kDhBN; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
            wmma::load_matrix_sync(a, Gs + tm * 16 * kDhLdG + kk, kDhLdG);
            wmma::load_matrix_sync(b, Bs + kk * kDhLdH + tj * 16, kDhLdH);
            wmma::mma_sync(dacc[i], a, b, dacc[i]);
          }
        }
      }
      if (dB32 != nullptr) {
        // dB chunk (32 x rp) = G^T (32 x BM, read column-major from Gs) . H_t (BM x rp)
#pragma unroll
        for (int i = 0; i < kDhTilesPerWarp; ++i) {
          const int tile = warp + 4 * i;
          if (tile < ntiles_db) {
            const int tn = tile & 1, tj = tile >> 1;
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
            wmma::fill_fragment(c, 0.f);
#pragma unroll
            for (int kk = 0; kk < kDhBM; kk += 16) {
              wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
              wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
              wmma::load_matrix_sync(a, Gs + kk * kDhLdG + tn * 16, kDhLdG);
              wmma::load_matrix_sync(b, Hs + kk * kDhLdH + tj * 16, kDhLdH);
              wmma::mma_sync(c, a, b, c);
            }
            wmma::store_matrix_sync(Cs + tn * 16 * kDhLdC + tj * 16, c, kDhLdC, wmma::mem_row_major);
          }
        }
        __syncthreads();
        for (int e = tid; e < kDhBN * r; e += kThreads) {
          const int nn = e / r, j = e % r;
          if (nb + nn < cnt) atomicAdd(dB32 + static_cast<int64_t>(boff + nb + nn) * r + j, Cs[nn * kDhLdC + j]);
        }
      }
      __syncthreads();
    }
    // write dh_t = s * acc
#pragma unroll
    for (int i = 0; i < kDhTilesPerWarp; ++i) {
      const int tile = warp + 4 * i;
      if (tile < ntiles) {
        const int tm = tile % kTm, tj = tile / kTm;
        wmma::store_matrix_sync(Cs + tm * 16 * kDhLdC + tj * 16, dacc[i], kDhLdC, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int e = tid; e < kDhBM * r; e += kThreads) {
      const int m = e / r, j = e % r;
      if (m0 + m < M) dh[static_cast<int64_t>(m0 + m) * R + t * r + j] = Cvt<T>::from_f(s * Cs[m * kDhLdC + j]);
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------ kernel 2: dx
// dx[m, k] = sum_n g[m, n] W[n, k] + keep(m, k) * inv * sum_j dh[m, j] A[j, k]
template <typename T_>
struct DxProblem {
  using T = T_;
  static constexpr bool A1K = true, B1K = false, HAS2 = true, A2K = true, B2K = false;
  const T* g;
  const T* W;
  const T* dh;
  const T* A;
  T* dx;
  int M, N, K, R;
  Dropout d;

  __device__ void a1(int m, int n0, T (&v)[8]) const {
    if (m >= M) return zero8(v);
    load8(g + static_cast<int64_t>(m) * N, n0, 0, N, v);
  }
  __device__ void b1(int n, int k0, T (&v)[8]) const {  // (reduction index n, output columns k0..k0+7)
    if (n >= N) return zero8(v);
    load8(W + static_cast<int64_t>(n) * K, k0, 0, K, v);
  }
  __device__ void a2(int m, int j0, T (&v)[8]) const {
    if (m >= M) return zero8(v);
    load8(dh + static_cast<int64_t>(m) * R, j0, 0, R, v);
  }
  __device__ void b2(int j, int k0, T (&v)[8]) const {
    if (j >= R) return zero8(v);
    load8(A + static_cast<int64_t>(j) * K, k0, 0, K, v);
  }
  __device__ void range1(int, int& lo, int& hi) const { lo = 0; hi = N; }
  __device__ void range2(int, int& lo, int& hi) const { lo = 0; hi = R; }
  __device__ void epilogue(int m, int k0, const float* c1, const float* c2) const {
    if (m >= M) return;
    const uint32_t bits = keep8(d, m, k0 >> 3);
    const float scale = d.on ? d.inv : 1.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int k = k0 + i;
      if (k < K) {
        const float low = ((bits >> i) & 1u) ? c2[i] * scale : 0.f;
        dx[static_cast<int64_t>(m) * K + k] = Cvt<T>::from_f(c1[i] + low);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------ kernel 3: dA
// dA32[j, k] += sum_{m in this split} dh[m, j] keep(m, k) x[m, k]   (output tile rows j, columns k)
template <typename T_>
struct DaProblem {
  using T = T_;
  static constexpr bool A1K = false, B1K = false, HAS2 = false, A2K = false, B2K = false;
  const T* dh;
  const T* x;
  float* dA32;
  int M, K, R, rows_per_split;
  Dropout d;

  __device__ void a1(int m, int j0, T (&v)[8]) const {  // (reduction index m, output rows j0..j0+7)
    if (m >= M) return zero8(v);
    load8(dh + static_cast<int64_t>(m) * R, j0, 0, R, v);
  }
  __device__ void b1(int m, int k0, T (&v)[8]) const {  // (reduction index m, output columns k0..k0+7)
    if (m >= M) return zero8(v);
    load8(x + static_cast<int64_t>(m) * K, k0, 0, K, v);
    apply_keep8(v, keep8(d, m, k0 >> 3));
  }
  __device__ void range1(int z, int& lo, int& hi) const {
    lo = z * rows_per_split;
    hi = min(M, lo + rows_per_split);
  }
  __device__ void epilogue(int j, int k0, const float* c1, const float*) const {
    if (j >= R) return;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (k0 + i < K) atomicAdd(dA32 + static_cast<int64_t>(j) * K + k0 + i, c1[i]);
  }
};

template <typename T>
cudaError_t dh_db_impl(const void* g, const void* h, const void* B, void* dh, float* dB32, int M, int N, int r,
                       Slices sl, float scaling, cudaStream_t stream) {
  if (M > 0 && sl.ntgt > 0 && r > 0) {
    const T* gp = static_cast<const T*>(g);
    const T* hp = static_cast<const T*>(h);
    const T* Bp = static_cast<const T*>(B);
    T* dhp = static_cast<T*>(dh);
    if (r <= 32) {
      dh_db_kernel<T, 128, 32><<<ceil_div(M, 128), kThreads, 0, stream>>>(gp, hp, Bp, dhp, dB32, M, N, r, sl, scaling);
    } else {
      dh_db_kernel<T, 32, kMaxRank><<<ceil_div(M, 32), kThreads, 0, stream>>>(gp, hp, Bp, dhp, dB32, M, N, r, sl,
                                                                              scaling);
    }
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dx_impl(const void* g, const void* W, const void* dh, const void* A, void* dx, int M, int N, int K, int R,
                    Dropout d, cudaStream_t stream) {
  if (M > 0 && K > 0) {
    DxProblem<T> p{static_cast<const T*>(g), static_cast<const T*>(W), static_cast<const T*>(dh),
                   static_cast<const T*>(A), static_cast<T*>(dx), M, N, K, R, d};
    gemm_kernel<<<dim3(ceil_div(M, kBM), ceil_div(K, kBN), 1), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t da_impl(const void* dh, const void* x, float* dA32, int M, int K, int R, Dropout d, int num_sms,
                    cudaStream_t stream) {
  if (M > 0 && K > 0 && R > 0) {
    const int tiles = ceil_div(R, kBM) * ceil_div(K, kBN);
    // enough blocks for ~4 waves of 128-thread blocks, each split at least 256 rows, a multiple of the slab
    int splits = max(1, min(ceil_div(M, 256), ceil_div(4 * max(num_sms, 1), tiles)));
    const int rows = ceil_div(ceil_div(M, splits), kBK) * kBK;
    splits = ceil_div(M, rows);
    DaProblem<T> p{static_cast<const T*>(dh), static_cast<const T*>(x), dA32, M, K, R, rows, d};
    gemm_kernel<<<dim3(ceil_div(R, kBM), ceil_div(K, kBN), splits), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dh_db(DType dt, const void* g, const void* h, const void* B, void* dh, float* dB32, int M, int N,
                         int r, Slices sl, float scaling, cudaStream_t stream) {
  if (r > kMaxRank) return cudaErrorInvalidValue;
  if (dt == DType::kHalf) return dh_db_impl<__half>(g, h, B, dh, dB32, M, N, r, sl, scaling, stream);
  return dh_db_impl<__nv_bfloat16>(g, h, B, dh, dB32, M, N, r, sl, scaling, stream);
}

cudaError_t launch_dx(DType dt, const void* g, const void* W, const void* dh, const void* A, void* dx, int M, int N,
                      int K, int R, Dropout d, cudaStream_t stream) {
  if (dt == DType::kHalf) return dx_impl<__half>(g, W, dh, A, dx, M, N, K, R, d, stream);
  return dx_impl<__nv_bfloat16>(g, W, dh, A, dx, M, N, K, R, d, stream);
}

cudaError_t launch_da(DType dt, const void* dh, const void* x, float* dA32, int M, int K, int R, Dropout d,
                      int num_sms, cudaStream_t stream) {
  if (dt == DType::kHalf) return da_impl<__half>(dh, x, dA32, M, K, R, d, num_sms, stream);
  return da_impl<__nv_bfloat16>(dh, x, dA32, M, K, R, d, num_sms, stream);
}

}  // namespace lora_fused
