// The sm_90a GEMM, backward dx (g W + mask * (dh' A)), fp16: one instantiation per file, so ninja compiles them in parallel.
#if !defined(LF_BUILD_SM90_GEMMS) || LF_BUILD_SM90_GEMMS
#include "sm90_gemm.cuh"

LF_SM90_INSTANTIATE(lora_fused::DType::kHalf, true)
#else
#include "lora_launch.h"

LF_GEMM_NOT_BUILT(gemm_sm90, lora_fused::DType::kHalf, true)
#endif
