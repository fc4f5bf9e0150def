// The CUTLASS element type of each DType the binding passes.
#pragma once

#include <type_traits>

#include <cutlass/numeric_types.h>

#include "lora_launch.h"

namespace lora_fused {
template <DType D>
using ElementOf = std::conditional_t<D == DType::kHalf, cutlass::half_t, cutlass::bfloat16_t>;
}  // namespace lora_fused
