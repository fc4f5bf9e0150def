// The sm_80 (and every arch but sm_90a) GEMM, forward (y = x W^T + b + s h_t B_t^T), fp16: one instantiation per file, so ninja compiles them in parallel.
#if !defined(LF_BUILD_SM80_GEMMS) || LF_BUILD_SM80_GEMMS
#include "sm80_gemm.cuh"

LF_SM80_INSTANTIATE(lora_fused::DType::kHalf, false)
#else
#include "lora_launch.h"

LF_GEMM_NOT_BUILT(gemm_sm80, lora_fused::DType::kHalf, false)
#endif
