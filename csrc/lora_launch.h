// Host-side interface between the torch binding (binding.cpp, compiled by the C++ compiler with the torch
// headers) and the kernels (lora_fwd.cu, lora_bwd.cu, compiled by nvcc WITHOUT any torch header, which keeps
// the nvcc part of the build fast). Only raw pointers, sizes and a cudaStream_t cross this boundary.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace lora_fused {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

constexpr int kMaxTargets = 3;   // q, k, v
constexpr int kMaxRank = 128;    // per-target rank r supported by the backward dh/dB kernel

// Output-column slices of the packed adapters (see lora_fused/kernels/reference/lora_linear.py):
// target t updates columns off[t] .. off[t]+cnt[t] of y, uses rows t*r .. t*r+r of A and rows
// boff[t] .. boff[t]+cnt[t] of B (boff[t] = cnt[0] + ... + cnt[t-1]).
struct Slices {
  int ntgt;
  int off[kMaxTargets];
  int cnt[kMaxTargets];
  int boff[kMaxTargets];
};

// Dropout: keep(row, col) = philox16(seed, row, col) >= thr; kept values are scaled by inv = 1/(1-p).
// on == false: no dropout (seed unused, may be null).
struct Dropout {
  const int64_t* seed;  // one int64 on the device, read inside the kernels (no host sync)
  uint32_t thr;         // round(p * 65536), clamped to 65535
  float inv;            // 1 / (1 - p)
  bool on;
};

// Forward: h = dropout(x) A^T (M x R), y = x W^T + b + s * h_t B_t^T per target slice (M x N).
cudaError_t launch_forward(DType dt, const void* x, const void* W, const void* bias, const void* A, const void* B,
                           void* y, void* h, int M, int N, int K, int r, Slices sl, float scaling, Dropout d,
                           cudaStream_t stream);

// Backward, step 1: dh = s * g_t B_t (M x R, written in the input dtype) and, if dB32 != nullptr,
// dB32 += g_t^T h_t (sum_t N_t x r, float32, must be zeroed by the caller; the caller scales by s).
cudaError_t launch_dh_db(DType dt, const void* g, const void* h, const void* B, void* dh, float* dB32, int M, int N,
                         int r, Slices sl, float scaling, cudaStream_t stream);

// Backward, step 2: dx = g W + keep * (dh A) * inv (M x K).
cudaError_t launch_dx(DType dt, const void* g, const void* W, const void* dh, const void* A, void* dx, int M, int N,
                      int K, int R, Dropout d, cudaStream_t stream);

// Backward, step 3: dA32 += dh^T (keep * x) (R x K, float32, zeroed by the caller; the caller scales by inv).
cudaError_t launch_da(DType dt, const void* dh, const void* x, float* dA32, int M, int K, int R, Dropout d,
                      int num_sms, cudaStream_t stream);

// Debug/test helper: the keep mask as uint8 (M x K), from the same device function the kernels use.
cudaError_t launch_keep_mask(uint8_t* out, int M, int K, Dropout d, cudaStream_t stream);

}  // namespace lora_fused
