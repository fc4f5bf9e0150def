// sm80 GEMM, forward (y = x W^T + b + s h_t B_t^T), bf16. One instantiation per file: ninja compiles them in parallel.
#include "sm80_gemm.cuh"

LORA_FUSED_SM80_INSTANTIATE(lora_fused::DType::kBFloat16, false)
