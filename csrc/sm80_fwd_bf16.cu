// The sm_80 (and every arch but sm_90a) GEMM, forward (y = x W^T + b + s h_t B_t^T), bf16: one instantiation per file, so ninja compiles them in parallel.
#if !defined(LORA_FUSED_SM80_GEMMS) || LORA_FUSED_SM80_GEMMS
#include "sm80_gemm.cuh"

LORA_FUSED_SM80_INSTANTIATE(lora_fused::DType::kBFloat16, false)
#else
#include "lora_launch.h"

LORA_FUSED_GEMM_NOT_BUILT(gemm_sm80, lora_fused::DType::kBFloat16, false)
#endif
