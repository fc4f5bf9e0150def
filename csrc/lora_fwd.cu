// Forward of the LoRA linear (see shared/design/KERNELS.md):
//   kernel 1: h = dropout(x) A^T                       (M x R, R = T*r; the mask generated from the seed)
//   kernel 2: y = x W^T + b + s * h_t B_t^T           (the low-rank term is a second reduction into a second
//             accumulator of the same block tile, added with the bias in the epilogue: no extra pass over y)
#include "lora_common.cuh"

namespace lora_fused {
namespace {

// ---- kernel 1: h[m, j] = inv * sum_k keep(m, k) x[m, k] A[j, k]
template <typename T_>
struct DownProblem {
  using T = T_;
  static constexpr bool A1K = true, B1K = true, HAS2 = false, A2K = true, B2K = true;
  const T* x;
  const T* A;
  T* h;
  int M, K, R;
  Dropout d;

  __device__ void a1(int m, int k0, T (&v)[8]) const {
    if (m >= M) return zero8(v);
    load8(x + static_cast<int64_t>(m) * K, k0, 0, K, v);
    apply_keep8(v, keep8(d, m, k0 >> 3));
  }
  __device__ void b1(int j, int k0, T (&v)[8]) const {
    if (j >= R) return zero8(v);
    load8(A + static_cast<int64_t>(j) * K, k0, 0, K, v);
  }
  __device__ void range1(int, int& lo, int& hi) const { lo = 0; hi = K; }
  __device__ void epilogue(int m, int n0, const float* c1, const float*) const {
    if (m >= M) return;
    const float scale = d.on ? d.inv : 1.f;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (n0 + i < R) h[static_cast<int64_t>(m) * R + n0 + i] = Cvt<T>::from_f(c1[i] * scale);
  }
};

// ---- kernel 2: y[m, n] = sum_k x[m, k] W[n, k] + s * sum_j h[m, j] Beff[j, n] + b[n]
// Beff[j, n] = B[boff_t + n - off_t, j - t*r] when column n lies in target t's slice and j in its rank block,
// else 0: a tile that straddles a q/k/v boundary is handled element by element in the loader.
template <typename T_>
struct MainProblem {
  using T = T_;
  static constexpr bool A1K = true, B1K = true, HAS2 = true, A2K = true, B2K = true;
  const T* x;
  const T* W;
  const T* bias;  // may be null
  const T* h;
  const T* B;
  T* y;
  int M, N, K, r, R;
  Slices sl;
  float s;

  __device__ void a1(int m, int k0, T (&v)[8]) const {
    if (m >= M) return zero8(v);
    load8(x + static_cast<int64_t>(m) * K, k0, 0, K, v);
  }
  __device__ void b1(int n, int k0, T (&v)[8]) const {
    if (n >= N) return zero8(v);
    load8(W + static_cast<int64_t>(n) * K, k0, 0, K, v);
  }
  __device__ void a2(int m, int j0, T (&v)[8]) const {
    if (m >= M) return zero8(v);
    load8(h + static_cast<int64_t>(m) * R, j0, 0, R, v);
  }
  __device__ void b2(int n, int j0, T (&v)[8]) const {
    if (n < N) {
#pragma unroll
      for (int t = 0; t < kMaxTargets; ++t) {
        if (t < sl.ntgt && n >= sl.off[t] && n < sl.off[t] + sl.cnt[t]) {
          // row of B for column n, shifted so that index j (in h's column space) addresses B[., j - t*r]
          const T* row = B + static_cast<int64_t>(sl.boff[t] + n - sl.off[t]) * r - t * r;
          load8(row, j0, t * r, t * r + r, v);
          return;
        }
      }
    }
    zero8(v);
  }
  __device__ void range1(int, int& lo, int& hi) const { lo = 0; hi = K; }
  __device__ void range2(int n0, int& lo, int& hi) const {
    lo = R;
    hi = 0;
#pragma unroll
    for (int t = 0; t < kMaxTargets; ++t) {  // unrolled: no run-time indexing of the parameter struct
      const int a = sl.off[t], b = sl.off[t] + sl.cnt[t];
      if (t < sl.ntgt && sl.cnt[t] > 0 && a < n0 + kBN && b > n0) {
        lo = min(lo, t * r);
        hi = max(hi, t * r + r);
      }
    }
  }
  __device__ void epilogue(int m, int n0, const float* c1, const float* c2) const {
    if (m >= M) return;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int n = n0 + i;
      if (n < N) {
        float acc = c1[i] + s * c2[i];
        if (bias != nullptr) acc += Cvt<T>::to_f(bias[n]);
        y[static_cast<int64_t>(m) * N + n] = Cvt<T>::from_f(acc);
      }
    }
  }
};

template <typename T>
cudaError_t forward_impl(const void* x, const void* W, const void* bias, const void* A, const void* B, void* y,
                         void* h, int M, int N, int K, int r, Slices sl, float scaling, Dropout d,
                         cudaStream_t stream) {
  const int R = sl.ntgt * r;
  if (M > 0 && R > 0) {
    DownProblem<T> p{static_cast<const T*>(x), static_cast<const T*>(A), static_cast<T*>(h), M, K, R, d};
    gemm_kernel<<<dim3(ceil_div(M, kBM), ceil_div(R, kBN), 1), kThreads, 0, stream>>>(p);
  }
  if (M > 0 && N > 0) {
    MainProblem<T> p{static_cast<const T*>(x), static_cast<const T*>(W), static_cast<const T*>(bias),
                     static_cast<const T*>(h), static_cast<const T*>(B), static_cast<T*>(y), M, N, K, r, R, sl,
                     scaling};
    gemm_kernel<<<dim3(ceil_div(M, kBM), ceil_div(N, kBN), 1), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

__global__ void keep_mask_kernel(uint8_t* out, int M, int K, Dropout d) {
  const int64_t groups = static_cast<int64_t>(M) * ((K + 7) / 8);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(g / ((K + 7) / 8)), grp = static_cast<int>(g % ((K + 7) / 8));
    const uint32_t bits = keep8(d, row, grp);
    for (int i = 0; i < 8; ++i) {
      const int col = grp * 8 + i;
      if (col < K) out[static_cast<int64_t>(row) * K + col] = static_cast<uint8_t>((bits >> i) & 1u);
    }
  }
}

}  // namespace

cudaError_t launch_forward(DType dt, const void* x, const void* W, const void* bias, const void* A, const void* B,
                           void* y, void* h, int M, int N, int K, int r, Slices sl, float scaling, Dropout d,
                           cudaStream_t stream) {
  if (dt == DType::kHalf) return forward_impl<__half>(x, W, bias, A, B, y, h, M, N, K, r, sl, scaling, d, stream);
  return forward_impl<__nv_bfloat16>(x, W, bias, A, B, y, h, M, N, K, r, sl, scaling, d, stream);
}

cudaError_t launch_keep_mask(uint8_t* out, int M, int K, Dropout d, cudaStream_t stream) {
  if (M > 0 && K > 0) {
    const int64_t groups = static_cast<int64_t>(M) * ((K + 7) / 8);
    const int blocks = static_cast<int>(groups / 256 + 1 < 65535 ? groups / 256 + 1 : 65535);
    keep_mask_kernel<<<blocks, 256, 0, stream>>>(out, M, K, d);
  }
  return cudaGetLastError();
}

}  // namespace lora_fused
