// sm80 GEMM, backward dx (g W + mask * (dh' A)), fp16. One instantiation per file: ninja compiles them in parallel.
#include "sm80_gemm.cuh"

LORA_FUSED_SM80_INSTANTIATE(lora_fused::DType::kHalf, true)
