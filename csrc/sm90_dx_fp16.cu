// The sm_90a GEMM, backward dx (g W + mask * (dh' A)), fp16: one instantiation per file, so ninja compiles them in parallel.
#if !defined(LORA_FUSED_SM90_GEMMS) || LORA_FUSED_SM90_GEMMS
#include "sm90_gemm.cuh"

LORA_FUSED_SM90_INSTANTIATE(lora_fused::DType::kHalf, true)
#else
#include "lora_launch.h"

LORA_FUSED_GEMM_NOT_BUILT(gemm_sm90, lora_fused::DType::kHalf, true)
#endif
