// Forward small kernels (every arch >= sm_80): h = x_hat A^T, its split-K finish, the packed s*B operand of
// the forward GEMM, and the keep-mask dump used by the tests.
#include "lora_small.cuh"

namespace lora_fused {
namespace {

using namespace small;

template <typename T, int RB>
cudaError_t down_rb(const DownParams<T>& p, const DownPlan& plan, cudaStream_t stream) {
  auto* k = &down_kernel<T, RB>;
  cudaError_t err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, DownSmem<RB>::kBytes);
  if (err != cudaSuccess) return err;
  k<<<dim3(plan.m_blocks, plan.r_blocks, plan.splits), kThreads, DownSmem<RB>::kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t down_impl(const void* x, int64_t ldx, const void* A, void* h, int64_t ldh, void* h_pad, int64_t ldh_pad,
                      float* ws, int M, int K, int R, Dropout d, const DownPlan& plan, cudaStream_t stream) {
  if (M == 0 || R == 0) return cudaSuccess;
  DownParams<T> p{static_cast<const T*>(x), ldx, static_cast<const T*>(A), static_cast<T*>(h), ldh,
                  static_cast<T*>(h_pad), ldh_pad, ws, M, K, R, plan.k_per_split, plan.splits, d};
  cudaError_t err;
  switch (plan.rb) {
    case 16: err = down_rb<T, 16>(p, plan, stream); break;
    case 32: err = down_rb<T, 32>(p, plan, stream); break;
    case 64: err = down_rb<T, 64>(p, plan, stream); break;
    default: err = down_rb<T, 128>(p, plan, stream); break;
  }
  if (err != cudaSuccess || plan.splits == 1) return err;
  finish_h_kernel<T><<<elementwise_blocks(static_cast<int64_t>(M) * padded_rank_cols(R)), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
__global__ void pack_b_kernel(const T* B, T* Bp, int64_t ldbp, int N, int R, int r, Slices sl, float s) {
  const int R8 = padded_rank_cols(R);
  const int64_t n_el = static_cast<int64_t>(N) * R8;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n_el;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int n = static_cast<int>(e / R8), j = static_cast<int>(e % R8);
    float v = 0.f;
    const int t = j / r;
#pragma unroll
    for (int tt = 0; tt < kMaxTargets; ++tt) {  // static indices: the slice table stays in registers
      if (tt == t && j < R && tt < sl.ntgt && n >= sl.off[tt] && n < sl.off[tt] + sl.cnt[tt])
        v = s * to_f<T>(B[static_cast<int64_t>(sl.boff[tt] + n - sl.off[tt]) * r + (j - tt * r)]);
    }
    Bp[static_cast<int64_t>(n) * ldbp + j] = from_f<T>(v);
  }
}

__global__ void keep_mask_kernel(uint8_t* out, int M, int K, Dropout d) {
  const uint64_t seed = load_seed(d);
  const int64_t groups = static_cast<int64_t>(M) * ((K + 7) / 8);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(g / ((K + 7) / 8)), grp = static_cast<int>(g % ((K + 7) / 8));
    const uint32_t bits = keep8(seed, d.thr, row, grp);
    for (int i = 0; i < 8; ++i) {
      const int col = grp * 8 + i;
      if (col < K) out[static_cast<int64_t>(row) * K + col] = static_cast<uint8_t>((bits >> i) & 1u);
    }
  }
}

}  // namespace

cudaError_t launch_down(DType dt, const void* x, int64_t ldx, const void* A, void* h, int64_t ldh, void* h_pad,
                        int64_t ldh_pad, float* ws, int M, int K, int R, Dropout d, const DownPlan& plan,
                        cudaStream_t stream) {
  if (dt == DType::kHalf)
    return down_impl<__half>(x, ldx, A, h, ldh, h_pad, ldh_pad, ws, M, K, R, d, plan, stream);
  return down_impl<__nv_bfloat16>(x, ldx, A, h, ldh, h_pad, ldh_pad, ws, M, K, R, d, plan, stream);
}

cudaError_t launch_pack_b(DType dt, const void* B, void* Bp, int64_t ldbp, int N, int R, int r, Slices sl, float s,
                          cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int blocks = elementwise_blocks(static_cast<int64_t>(N) * padded_rank_cols(R));
  if (dt == DType::kHalf) {
    pack_b_kernel<__half><<<blocks, 256, 0, stream>>>(static_cast<const __half*>(B), static_cast<__half*>(Bp), ldbp,
                                                       N, R, r, sl, s);
  } else {
    pack_b_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(B),
                                                             static_cast<__nv_bfloat16*>(Bp), ldbp, N, R, r, sl, s);
  }
  return cudaGetLastError();
}

cudaError_t launch_keep_mask(uint8_t* out, int M, int K, Dropout d, cudaStream_t stream) {
  if (M > 0 && K > 0) {
    keep_mask_kernel<<<elementwise_blocks(static_cast<int64_t>(M) * ((K + 7) / 8)), 256, 0, stream>>>(out, M, K, d);
  }
  return cudaGetLastError();
}

}  // namespace lora_fused
