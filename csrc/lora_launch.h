// Host interface between the torch binding (binding.cpp, compiled by the C++ compiler with the torch headers)
// and the kernels (*.cu, compiled by nvcc with CUTLASS/CuTe and without any torch header). Only raw pointers,
// strides, sizes, plans and a cudaStream_t cross this boundary.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lora_philox.cuh"
#include "lora_plan.h"

namespace lora_fused {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// One of the two big GEMMs, D (M x N) = A (M x Kred) . B^T  +  LA (M x R) . LB^T  (the low-rank phase):
//   forward (dx = false): A = x, B = W (N x Kred row-major), LA = h, LB = s*B packed per target (N x R), and
//                         D = y gets + bias in the epilogue; a tile runs only the low-rank K-blocks of the
//                         targets its columns touch (fwd_lowrank_blocks).
//   dx      (dx = true):  A = g, B(n, k) = W[k][n] (W is Kred x N row-major), LA = dh' = dh/(1-p), LB(n, j) =
//                         A_lora[j][n] (A_lora is R x N row-major); the low-rank phase runs first and its
//                         accumulator is masked with the dropout mask before the main phase adds g W.
// All leading dimensions are in elements; every operand's rows are contiguous and 16-byte aligned (TMA /
// cp.async), which the binding guarantees (rows_16b_aligned).
struct GemmArgs {
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  const void* la;
  int64_t ldla;
  const void* lb;
  int64_t ldlb;
  void* d;
  int64_t ldd;
  const void* bias;  // forward only, may be null
  int M, N, Kred, R;
  Slices sl;  // forward only
  int r;      // forward only: per-target rank
  Dropout drop;  // dx only
  int sms;       // multiprocessors of the device (persistent grid)
};

// Explicitly instantiated, one (dtype, direction) per translation unit so that ninja builds them in parallel.
// A build whose arch list has no use for one family (csrc_build.py sets LF_BUILD_SM90_GEMMS /
// LF_BUILD_SM80_GEMMS to 0) compiles that family's units as stubs: CuTe's host-side templates cost ~25 s per
// unit even when the device code is compiled out, and the binding never calls a family the build has no code for.
template <DType D, bool kDx>
cudaError_t gemm_sm90(const GemmArgs& args, cudaStream_t stream);
template <DType D, bool kDx>
cudaError_t gemm_sm80(const GemmArgs& args, cudaStream_t stream);

#define LF_GEMM_NOT_BUILT(FN, DT, DX)                                          \
  namespace lora_fused {                                                               \
  template <>                                                                          \
  cudaError_t FN<DT, DX>(const GemmArgs&, cudaStream_t) {                             \
    return cudaErrorNotSupported;                                                      \
  }                                                                                    \
  }

// ---- small kernels (sm80+, both archs)
// Forward kernel 1: h = x_hat A^T (M x R) into h (ld ldh) and, when h_pad != null, into h_pad (ld ldh_pad, the
// row stride the GEMM's TMA needs). ws: fp32 [splits][M][R] when plan.splits > 1.
cudaError_t launch_down(DType dt, const void* x, int64_t ldx, const void* A, void* h, int64_t ldh, void* h_pad,
                        int64_t ldh_pad, float* ws, int M, int K, int R, Dropout d, const DownPlan& plan,
                        cudaStream_t stream);

// s*B packed per target into Bp (N x R, ld ldbp): Bp[n][t*r + c] = s * B[boff_t + n - off_t][c] for n in slice t,
// zero elsewhere (the forward's low-rank B operand).
cudaError_t launch_pack_b(DType dt, const void* B, void* Bp, int64_t ldbp, int N, int R, int r, Slices sl, float s,
                          cudaStream_t stream);

// Backward kernel 1: dh' = s*g_t B_t*inv (M x R, into dh with ld lddh; columns R..lddh zeroed) when need_dh,
// dB = s*g_t^T h_t (sum N_t x r, into dB) when need_db. ws_dh: fp32 [jb_max][M][R] (when a target spans
// several column blocks), ws_db: fp32 [m_blocks][sum N_t][r] (when m_blocks > 1).
cudaError_t launch_dh_db(DType dt, const void* g, int64_t ldg, const void* h, int64_t ldh, const void* B, void* dh,
                         int64_t lddh, void* dB, float* ws_dh, float* ws_db, int M, int R, int r, Slices sl, float s,
                         float inv, bool need_dh, bool need_db, const DhDbPlan& plan, cudaStream_t stream);

// Backward kernel 3: dA = dh'^T (mask * x) (R x K) into dA; ws: fp32 [m_blocks][R][K] when m_blocks > 1.
cudaError_t launch_da(DType dt, const void* dh, int64_t lddh, const void* x, int64_t ldx, void* dA, float* ws, int M,
                      int K, int R, Dropout d, const DaPlan& plan, cudaStream_t stream);

// dB = s * sum_i ws_db[i] (n_db elements, when mb_db > 1) and dA = sum_i ws_da[i] (n_da, when mb_da > 1), in a
// fixed order; pass n = 0 for the one that was written directly.
cudaError_t launch_finish_grads(DType dt, const float* ws_db, void* dB, int64_t n_db, int mb_db, float s,
                                const float* ws_da, void* dA, int64_t n_da, int mb_da, cudaStream_t stream);

// Debug/test helper: the keep mask as uint8 (M x K), from the same device function the kernels use.
cudaError_t launch_keep_mask(uint8_t* out, int M, int K, Dropout d, cudaStream_t stream);

}  // namespace lora_fused
