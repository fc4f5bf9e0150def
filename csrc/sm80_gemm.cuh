// Ampere-class GEMM of the LoRA linear (sm_80, and any arch other than sm_90a: sm_86/89 run sm_80 code), built
// from CuTe parts: 16-byte cp.async into a 4-stage swizzled shared-memory ring (zero-filled outside the
// matrices), ldmatrix, mma.sync m16n8k16 with fp32 accumulation, a 128 x 256 x 32 CTA tile on 8 warps, and
// the grouped tile order of lora_plan.h.
//
// Same contract as the sm90 kernel (lora_launch.h, GemmArgs): the low-rank K-blocks run first from the second
// operand pair, then the main ones; for dx the accumulator is masked between the phases. The 16-byte loads
// read the low-rank operands up to their padded width (a multiple of 8 columns): the binding passes buffers
// whose padding columns are zero.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

#include "lora_dtype.cuh"
#include "lora_launch.h"
#include "lora_philox.cuh"
#include "lora_plan.h"

namespace lora_fused {
namespace sm80 {

using namespace cute;

template <class T_, bool kDx_>
struct Gemm {
  using T = T_;
  static constexpr bool kDx = kDx_;
  static constexpr int kBM = 128, kBN = 256, kBK = 32, kStages = 4, kThreads = 256;
  static_assert(kSm80Tiles.bm == kBM && kSm80Tiles.bn == kBN && kSm80Tiles.bk == kBK && kSm80Tiles.cluster_m == 1,
                "lora_plan.h's kSm80Tiles must describe this kernel");

  using MmaOp = conditional_t<is_same_v<T, cutlass::half_t>, SM80_16x8x16_F32F16F16F32_TN,
                              SM80_16x8x16_F32BF16BF16F32_TN>;
  // 8 warps, 2 along M x 4 along N; each holds 4 x 8 atoms (a 64 x 64 share of the tile). The 64-wide N
  // permutation tile gives each warp two n8 atoms per k16 step, as the x4 (transposed) ldmatrix needs.
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<_2, _4, _1>>, Tile<_32, _64, _16>>;

  // Shared memory: K-major tiles (rows x 32) in 64-byte rows, MN-major tiles (dx's B) 64-contiguous.
  using AtomK = decltype(composition(Swizzle<2, 3, 3>{}, Layout<Shape<_8, _32>, Stride<_32, _1>>{}));
  using AtomMN = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, Stride<_1, _64>>{}));
  using SmemA = decltype(tile_to_shape(AtomK{}, Shape<Int<kBM>, Int<kBK>, Int<kStages>>{}));
  using SmemB = decltype(tile_to_shape(conditional_t<kDx, AtomMN, AtomK>{}, Shape<Int<kBN>, Int<kBK>, Int<kStages>>{}));

  using CpAtom = Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>, T>;
  // K-major: 64 rows x 4 vectors of 8 per pass; MN-major: 32 vectors of 8 along n x 8 k per pass.
  using CopyK = decltype(make_tiled_copy(CpAtom{}, Layout<Shape<_64, _4>, Stride<_4, _1>>{}, Layout<Shape<_1, _8>>{}));
  using CopyMN = decltype(make_tiled_copy(CpAtom{}, Layout<Shape<_32, _8>, Stride<_1, _32>>{}, Layout<Shape<_8, _1>>{}));
  using CopyB = conditional_t<kDx, CopyMN, CopyK>;
  using LdsmA = Copy_Atom<SM75_U32x4_LDSM_N, T>;
  using LdsmB = conditional_t<kDx, Copy_Atom<SM75_U16x8_LDSM_T, T>, Copy_Atom<SM75_U32x4_LDSM_N, T>>;

  struct Params {
    const T* a;
    int64_t lda;
    const T* b;
    int64_t ldb;
    const T* la;
    int64_t ldla;
    const T* lb;
    int64_t ldlb;
    T* d;
    int64_t ldd;
    const T* bias;
    int M, N, Kred, R, R8;
    TileGrid grid;
    Slices sl;
    int r;
    Dropout drop;
  };

  struct SharedStorage {
    alignas(128) T A[cosize_v<SmemA>];
    alignas(128) T B[cosize_v<SmemB>];
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));

  // (rows, cols) row-major view with cols contiguous / (n, k) view with n contiguous.
  __device__ static auto rows_view(const T* ptr, int r, int c, int64_t ld) {
    return make_tensor(make_gmem_ptr(ptr), make_shape(r, c), make_stride(ld, _1{}));
  }
  __device__ static auto b_view(const T* ptr, int n, int k, int64_t ld) {
    if constexpr (kDx) {
      return make_tensor(make_gmem_ptr(ptr), make_shape(n, k), make_stride(_1{}, ld));
    } else {
      return make_tensor(make_gmem_ptr(ptr), make_shape(n, k), make_stride(ld, _1{}));
    }
  }

  // Copy the partitioned vectors whose first element lies inside (rows, cols); zero-fill the others. The
  // contiguous extent of every operand is a multiple of 8, so a vector is either wholly inside or outside.
  template <class TC, class Src, class Dst, class Crd>
  __device__ static void copy_zfill(TC const& tc, Src const& src, Dst&& dst, Crd const& crd, int rows, int cols) {
    CUTE_UNROLL
    for (int i = 0; i < size<1>(src); ++i) {
      CUTE_UNROLL
      for (int j = 0; j < size<2>(src); ++j) {
        auto c = crd(0, i, j);
        const bool ok = get<0>(c) < rows && get<1>(c) < cols;
        copy(tc.with(ok), src(_, i, j), dst(_, i, j));
      }
    }
  }

  __device__ static void run(Params const& p) {
    extern __shared__ char smem_raw[];
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
    const int tid = static_cast<int>(threadIdx.x);

    int mt = 0, nt = 0;
    unit_coord(p.grid, static_cast<int>(blockIdx.x), mt, nt);
    const int m0 = mt * kBM, n0 = nt * kBN;
    int lo = 0, hi = 0;
    if constexpr (kDx) {
      hi = dx_lowrank_blocks(p.R, kBK);
    } else {
      fwd_lowrank_blocks(p.sl, p.r, n0, kBN, kBK, lo, hi);
    }
    const int n_low = hi - lo;
    const int total = n_low + static_cast<int>(cdiv(p.Kred, kBK));

    Tensor sA = make_tensor(make_smem_ptr(ss.A), SmemA{});
    Tensor sB = make_tensor(make_smem_ptr(ss.B), SmemB{});
    // CTA tiles of the four operands and their coordinates (for the zero-fill predicates).
    auto tileA = Shape<Int<kBM>, Int<kBK>>{};
    auto tileB = Shape<Int<kBN>, Int<kBK>>{};
    Tensor gA = local_tile(rows_view(p.a, p.M, p.Kred, p.lda), tileA, make_coord(mt, _));
    Tensor cA = local_tile(make_identity_tensor(make_shape(p.M, p.Kred)), tileA, make_coord(mt, _));
    Tensor gLA = local_tile(rows_view(p.la, p.M, p.R8, p.ldla), tileA, make_coord(mt, _));
    Tensor cLA = local_tile(make_identity_tensor(make_shape(p.M, p.R8)), tileA, make_coord(mt, _));
    Tensor gB = local_tile(b_view(p.b, p.N, p.Kred, p.ldb), tileB, make_coord(nt, _));
    Tensor cB = local_tile(make_identity_tensor(make_shape(p.N, p.Kred)), tileB, make_coord(nt, _));
    // forward: s*B packed (N x R8, zero padding); dx: A_lora (R x N), rows beyond R are outside.
    const int lb_k = kDx ? p.R : p.R8;
    Tensor gLB = local_tile(b_view(p.lb, p.N, lb_k, p.ldlb), tileB, make_coord(nt, _));
    Tensor cLB = local_tile(make_identity_tensor(make_shape(p.N, lb_k)), tileB, make_coord(nt, _));

    CopyK copy_a;
    CopyB copy_b;
    auto ca = copy_a.get_thread_slice(tid);
    auto cb = copy_b.get_thread_slice(tid);
    Tensor tAgA = ca.partition_S(gA);
    Tensor tAcA = ca.partition_S(cA);
    Tensor tLgA = ca.partition_S(gLA);
    Tensor tLcA = ca.partition_S(cLA);
    Tensor tAsA = ca.partition_D(sA);
    Tensor tBgB = cb.partition_S(gB);
    Tensor tBcB = cb.partition_S(cB);
    Tensor tLgB = cb.partition_S(gLB);
    Tensor tLcB = cb.partition_S(cLB);
    Tensor tBsB = cb.partition_D(sB);

    auto load_stage = [&](int kb, int stage) {
      if (kb < n_low) {
        const int k = lo + kb;
        copy_zfill(copy_a, tLgA(_, _, _, k), tAsA(_, _, _, stage), tLcA(_, _, _, k), p.M, p.R8);
        copy_zfill(copy_b, tLgB(_, _, _, k), tBsB(_, _, _, stage), tLcB(_, _, _, k), p.N, lb_k);
      } else {
        const int k = kb - n_low;
        copy_zfill(copy_a, tAgA(_, _, _, k), tAsA(_, _, _, stage), tAcA(_, _, _, k), p.M, p.Kred);
        copy_zfill(copy_b, tBgB(_, _, _, k), tBsB(_, _, _, stage), tBcB(_, _, _, k), p.N, p.Kred);
      }
    };

    TiledMma mma;
    auto thr = mma.get_thread_slice(tid);
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // ((2, 2), 4, 8) fp32
    static_assert(decltype(size(acc))::value == Sm80Acc::kValues, "accumulator map of lora_plan.h");
    clear(acc);
    Tensor tCrA = thr.partition_fragment_A(sA(_, _, 0));
    Tensor tCrB = thr.partition_fragment_B(sB(_, _, 0));
    auto s2r_a = make_tiled_copy_A(LdsmA{}, mma);
    auto s2r_b = make_tiled_copy_B(LdsmB{}, mma);
    auto ta = s2r_a.get_thread_slice(tid);
    auto tb = s2r_b.get_thread_slice(tid);
    Tensor tXsA = ta.partition_S(sA);
    Tensor tXrA = ta.retile_D(tCrA);
    Tensor tXsB = tb.partition_S(sB);
    Tensor tXrB = tb.retile_D(tCrB);

    CUTE_UNROLL
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < total) load_stage(s, s);
      cp_async_fence();
    }
    const bool masked = kDx && p.drop.on;
    FragKeep<Sm80Acc> keep;
    if (masked) keep.compute_all(tid, m0, n0, load_seed(p.drop), p.drop.thr);  // overlaps the first loads

    for (int kt = 0; kt < total; ++kt) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // stage kt landed for everyone; stage kt-1 is free
      const int nxt = kt + kStages - 1;
      if (nxt < total) load_stage(nxt, nxt % kStages);
      cp_async_fence();
      if (masked && kt == n_low) keep.apply(acc);  // the low-rank phase is complete: mask it
      const int stage = kt % kStages;
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(tCrA); ++kk) {
        copy(s2r_a, tXsA(_, _, kk, stage), tXrA(_, _, kk));
        copy(s2r_b, tXsB(_, _, kk, stage), tXrB(_, _, kk));
        cute::gemm(mma, tCrA(_, _, kk), tCrB(_, _, kk), acc);
      }
    }
    if (masked && n_low == total) keep.apply(acc);

    // Epilogue: (+ bias) -> T, two adjacent columns per 4-byte store, rows/columns outside the output skipped.
    Tensor cC = thr.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      const int row = m0 + get<0>(cC(i)), col = n0 + get<1>(cC(i));
      if (row < p.M && col < p.N) {
        float a0 = acc(i), a1 = acc(i + 1);
        if constexpr (!kDx) {
          if (p.bias != nullptr) {
            a0 += static_cast<float>(p.bias[col]);
            a1 += static_cast<float>(p.bias[col + 1]);
          }
        }
        const T t0 = static_cast<T>(a0), t1 = static_cast<T>(a1);
        const uint32_t packed = static_cast<uint32_t>(t0.raw()) | (static_cast<uint32_t>(t1.raw()) << 16);
        *reinterpret_cast<uint32_t*>(p.d + static_cast<int64_t>(row) * p.ldd + col) = packed;
      }
    }
  }
};

template <class K>
__global__ void __launch_bounds__(K::kThreads, 1) gemm_kernel(typename K::Params const p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  K::run(p);
#endif
}

template <class K>
cudaError_t launch(const GemmArgs& a, cudaStream_t stream) {
  using T = typename K::T;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  typename K::Params p{static_cast<const T*>(a.a),
                       a.lda,
                       static_cast<const T*>(a.b),
                       a.ldb,
                       static_cast<const T*>(a.la),
                       a.ldla,
                       static_cast<const T*>(a.lb),
                       a.ldlb,
                       static_cast<T*>(a.d),
                       a.ldd,
                       static_cast<const T*>(a.bias),
                       a.M,
                       a.N,
                       a.Kred,
                       a.R,
                       padded_rank_cols(a.R),
                       make_tile_grid(a.M, a.N, kSm80Tiles, kRasterGroup),
                       a.sl,
                       a.r,
                       a.drop};
  auto* kernel = &gemm_kernel<K>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<p.grid.units, K::kThreads, K::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm80

}  // namespace lora_fused

// One explicit instantiation per translation unit (csrc/sm80_{fwd,dx}_{bf16,fp16}.cu).
#define LF_SM80_INSTANTIATE(DT, DX)                                                             \
  namespace lora_fused {                                                                                \
  template <>                                                                                           \
  cudaError_t gemm_sm80<DT, DX>(const GemmArgs& args, cudaStream_t stream) {                           \
    return sm80::launch<sm80::Gemm<ElementOf<DT>, DX>>(args, stream);                                 \
  }                                                                                                     \
  }
