// sm90a GEMM, forward (y = x W^T + b + s h_t B_t^T), bf16. One instantiation per file: ninja compiles them in parallel.
#include "sm90_gemm.cuh"

LORA_FUSED_SM90_INSTANTIATE(lora_fused::DType::kBFloat16, false)
