// sm90a GEMM, backward dx (g W + mask * (dh' A)), fp16. One instantiation per file: ninja compiles them in parallel.
#include "sm90_gemm.cuh"

LORA_FUSED_SM90_INSTANTIATE(lora_fused::DType::kHalf, true)
