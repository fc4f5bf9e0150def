// Host-side checks that the hand-written accumulator maps of lora_plan.h (used by the dropout mask and the
// epilogues) match what CuTe's own partitioning gives for the kernels' real TiledMMA types, and that the epilogue
// staging layout keeps each pair of adjacent output columns in one 4-byte word. Compiled by nvcc as host code
// only (no kernel is instantiated) and run on the CPU by tests/test_cuda_host.py.
//
//   nvcc -std=c++17 --expt-relaxed-constexpr -I csrc -I <cutlass>/include csrc/tests/test_layouts.cu -o t && ./t
#include <cstdio>

#include "check.h"
#include "sm80_gemm.cuh"
#include "sm90_gemm.cuh"

using namespace cute;
using namespace lora_fused;


template <class TiledMma, class Acc, int BM, int BN>
void check_acc_map(const char* name) {
  TiledMma mma;
  CHECK(int(size(mma)) == Acc::kThreads, "%s threads %d", name, int(size(mma)));
  auto cC = make_identity_tensor(Shape<Int<BM>, Int<BN>>{});
  for (int t = 0; t < Acc::kThreads; ++t) {
    auto part = mma.get_thread_slice(t).partition_C(cC);
    CHECK(int(size(part)) == Acc::kValues, "%s values %d", name, int(size(part)));
    for (int i = 0; i < Acc::kValues; ++i) {
      const int row = int(get<0>(part(i))), col = int(get<1>(part(i)));
      CHECK(row == Acc::row(t, i) && col == Acc::col(t, i), "%s t=%d i=%d CuTe (%d, %d) map (%d, %d)", name, t, i,
            row, col, Acc::row(t, i), Acc::col(t, i));
    }
  }
}

template <class K>
void check_sm90(const char* name) {
  check_acc_map<typename K::TiledMma, Sm90Acc, 128, 256>(name);
  // Epilogue staging tile: (row, col) and (row, col + 1), col even, are adjacent (one 4-byte store).
  typename K::SmemD sd;
  for (int row = 0; row < 64; ++row)
    for (int col = 0; col < 64; col += 2) CHECK(int(sd(row, col + 1)) == int(sd(row, col)) + 1, "%s smemD", name);
  std::printf("%s: %d bytes of shared memory per CTA\n", name, K::kSmemBytes);
}

template <class K>
void check_sm80(const char* name) {
  check_acc_map<typename K::TiledMma, Sm80Acc, 128, 256>(name);
  std::printf("%s: %d bytes of shared memory per CTA\n", name, K::kSmemBytes);
}

int main() {
  check_sm90<sm90::Gemm<cutlass::bfloat16_t, false>>("sm90 fwd bf16");
  check_sm90<sm90::Gemm<cutlass::bfloat16_t, true>>("sm90 dx bf16");
  check_sm90<sm90::Gemm<cutlass::half_t, false>>("sm90 fwd fp16");
  check_sm90<sm90::Gemm<cutlass::half_t, true>>("sm90 dx fp16");
  check_sm80<sm80::Gemm<cutlass::bfloat16_t, false>>("sm80 fwd bf16");
  check_sm80<sm80::Gemm<cutlass::bfloat16_t, true>>("sm80 dx bf16");
  check_sm80<sm80::Gemm<cutlass::half_t, false>>("sm80 fwd fp16");
  check_sm80<sm80::Gemm<cutlass::half_t, true>>("sm80 dx fp16");
  return check_summary();
}
