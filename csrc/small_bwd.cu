// Backward small kernels (every arch >= sm_80): dh' and dB from one read of g, dA from one read of x, and the
// fixed-order sums of their cross-CTA partials.
#include "lora_small.cuh"

namespace lora_fused {
namespace {

using namespace small;

template <typename T, int RB>
cudaError_t dh_db_rb(const DhDbParams<T>& p, cudaStream_t stream) {
  auto* k = &dh_db_kernel<T, RB>;
  cudaError_t err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, DhDbShape<RB>::kBytes);
  if (err != cudaSuccess) return err;
  k<<<dim3(p.plan.m_blocks, p.plan.jb_total), kThreads, DhDbShape<RB>::kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dh_db_impl(const void* g, int64_t ldg, const void* h, int64_t ldh, const void* B, void* dh, int64_t lddh,
                       void* dB, float* ws_dh, float* ws_db, int M, int R, int r, Slices sl, float s, float inv,
                       bool need_dh, bool need_db, const DhDbPlan& plan, cudaStream_t stream) {
  if (M == 0 || plan.jb_total == 0 || !(need_dh || need_db)) return cudaSuccess;
  int nb = 0;
  bool vec = (reinterpret_cast<uintptr_t>(g) % 16 == 0) && (ldg % 8 == 0);
  for (int t = 0; t < sl.ntgt; ++t) {
    nb += sl.cnt[t];
    vec = vec && (sl.off[t] % 8 == 0);
  }
  DhDbParams<T> p{static_cast<const T*>(g), ldg, static_cast<const T*>(h), ldh, static_cast<const T*>(B),
                  static_cast<T*>(dh), lddh, static_cast<T*>(dB), ws_dh, ws_db, M, R, r, nb, sl, plan, s, inv,
                  need_dh, need_db, vec};
  cudaError_t err;
  switch (plan.rb) {
    case 16: err = dh_db_rb<T, 16>(p, stream); break;
    case 32: err = dh_db_rb<T, 32>(p, stream); break;
    case 64: err = dh_db_rb<T, 64>(p, stream); break;
    default: err = dh_db_rb<T, 128>(p, stream); break;
  }
  if (err != cudaSuccess) return err;
  if (need_dh && plan.jb_max > 1) {
    finish_dh_kernel<T><<<elementwise_blocks(static_cast<int64_t>(M) * R), 256, 0, stream>>>(p);
    err = cudaGetLastError();
  }
  return err;
}

template <typename T, int RB>
cudaError_t da_rb(const DaParams<T>& p, cudaStream_t stream) {
  auto* k = &da_kernel<T, RB>;
  cudaError_t err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, DaShape<RB>::kBytes);
  if (err != cudaSuccess) return err;
  k<<<dim3(p.plan.m_blocks, p.plan.k_blocks, p.plan.r_blocks), kThreads, DaShape<RB>::kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t da_impl(const void* dh, int64_t lddh, const void* x, int64_t ldx, void* dA, float* ws, int M, int K, int R,
                    Dropout d, const DaPlan& plan, cudaStream_t stream) {
  if (M == 0 || K == 0 || R == 0) return cudaSuccess;
  DaParams<T> p{static_cast<const T*>(dh), lddh, static_cast<const T*>(x), ldx, static_cast<T*>(dA), ws, M, K, R,
                plan, d};
  switch (plan.rb) {
    case 16: return da_rb<T, 16>(p, stream);
    case 32: return da_rb<T, 32>(p, stream);
    case 64: return da_rb<T, 64>(p, stream);
    default: return da_rb<T, 128>(p, stream);
  }
}

template <typename T>
cudaError_t finish_impl(const float* ws_db, void* dB, int64_t n_db, int mb_db, float s, const float* ws_da, void* dA,
                        int64_t n_da, int mb_da, cudaStream_t stream) {
  FinishParams<T> p{ws_db, static_cast<T*>(dB), n_db, mb_db, s, ws_da, static_cast<T*>(dA), n_da, mb_da};
  if (n_db + n_da == 0) return cudaSuccess;
  finish_grads_kernel<T><<<elementwise_blocks(n_db + n_da), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dh_db(DType dt, const void* g, int64_t ldg, const void* h, int64_t ldh, const void* B, void* dh,
                         int64_t lddh, void* dB, float* ws_dh, float* ws_db, int M, int R, int r, Slices sl, float s,
                         float inv, bool need_dh, bool need_db, const DhDbPlan& plan, cudaStream_t stream) {
  if (dt == DType::kHalf)
    return dh_db_impl<__half>(g, ldg, h, ldh, B, dh, lddh, dB, ws_dh, ws_db, M, R, r, sl, s, inv, need_dh, need_db,
                              plan, stream);
  return dh_db_impl<__nv_bfloat16>(g, ldg, h, ldh, B, dh, lddh, dB, ws_dh, ws_db, M, R, r, sl, s, inv, need_dh,
                                   need_db, plan, stream);
}

cudaError_t launch_da(DType dt, const void* dh, int64_t lddh, const void* x, int64_t ldx, void* dA, float* ws, int M,
                      int K, int R, Dropout d, const DaPlan& plan, cudaStream_t stream) {
  if (dt == DType::kHalf) return da_impl<__half>(dh, lddh, x, ldx, dA, ws, M, K, R, d, plan, stream);
  return da_impl<__nv_bfloat16>(dh, lddh, x, ldx, dA, ws, M, K, R, d, plan, stream);
}

cudaError_t launch_finish_grads(DType dt, const float* ws_db, void* dB, int64_t n_db, int mb_db, float s,
                                const float* ws_da, void* dA, int64_t n_da, int mb_da, cudaStream_t stream) {
  if (dt == DType::kHalf) return finish_impl<__half>(ws_db, dB, n_db, mb_db, s, ws_da, dA, n_da, mb_da, stream);
  return finish_impl<__nv_bfloat16>(ws_db, dB, n_db, mb_db, s, ws_da, dA, n_da, mb_da, stream);
}

}  // namespace lora_fused
