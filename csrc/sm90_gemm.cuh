// Hopper (sm_90a) GEMM of the LoRA linear, built from CUTLASS 3 / CuTe parts: TMA tensor loads into a 4-stage
// shared-memory pipeline (cutlass::PipelineTmaAsync, mbarrier-tracked), wgmma (GMMA) from shared memory,
// warp specialization (one producer warp issues every TMA; two consumer warpgroups of 64 x 256 each run the
// wgmmas and the epilogue), a persistent grid of 2-CTA clusters over a grouped tile order, the B tile
// multicast to both CTAs of a cluster, and a TMA-store epilogue through swizzled shared memory.
//
//   D (M x N) = A (M x Kred) B^T  with a low-rank phase  LA (M x R) LB^T  in front of the main one.
//
// The low-rank term enters as extra K-blocks: the producer loads the tile's low-rank blocks from a second pair
// of TMA descriptors ([h | s*B] forward, [dh' | A] for dx), then switches to the main descriptors ([x | W],
// [g | W]); both phases land in the same stages and accumulate into the same registers. For dx the consumers
// mask the accumulator with the dropout mask between the two phases (the mask multiplies only the low-rank
// term); that tile's keep bits are computed during the previous tile's main loop. docs/cuda.md has the costs.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/copy_sm90.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "lora_dtype.cuh"
#include "lora_launch.h"
#include "lora_philox.cuh"
#include "lora_plan.h"

namespace lora_fused {
namespace sm90 {

using namespace cute;

template <class T_, bool kDx_>
struct Gemm {
  using T = T_;
  static constexpr bool kDx = kDx_;
  using Tile = Shape<_128, _256, _64>;
  using Cluster = Shape<_2, _1, _1>;
  static constexpr int kStages = 4;
  static constexpr int kThreads = 384;  // warpgroup 0: producer; warpgroups 1, 2: consumers
  static constexpr int kConsumerThreads = 256;
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(kSm90Tiles.bm == 128 && kSm90Tiles.bn == 256 && kSm90Tiles.bk == 64 && kSm90Tiles.cluster_m == 2,
                "lora_plan.h's kSm90Tiles must describe this kernel");

  // B of the forward is W (N x Kred), contiguous along the reduction (K-major); B of dx is W read as
  // (n = column of W, k = row of W), contiguous along n (MN-major). The low-rank B operands match: s*B packed
  // (N x R, K-major) and A_lora (R x N, MN-major).
  static constexpr GMMA::Major kMajorB = kDx ? GMMA::Major::MN : GMMA::Major::K;
  using AtomA = GMMA::Layout_K_SW128_Atom<T>;
  using AtomB = conditional_t<kDx, GMMA::Layout_MN_SW128_Atom<T>, GMMA::Layout_K_SW128_Atom<T>>;
  using SmemA = decltype(tile_to_shape(AtomA{}, make_shape(_128{}, _64{}, Int<kStages>{})));
  // MN-major: stack atoms along K first so each 64 (n) x 64 (k) block is one TMA box.
  using SmemB = decltype(tile_to_shape(AtomB{}, make_shape(_256{}, _64{}, Int<kStages>{}),
                                       conditional_t<kDx, Step<_2, _1, _3>, Step<_1, _2, _3>>{}));
  // Epilogue sub-tile: 64 x 64 of the output, row-major, 128-byte swizzle (conflict-free pair stores).
  using SmemD = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(_64{}, _64{})));
  static constexpr int kSubTiles = 4;  // 64-column sub-tiles of a warpgroup's 64 x 256 half tile

  using TiledMma = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Tile, GMMA::Major::K, kMajorB>(),
                                           Layout<Shape<_2, _1, _1>>{}));
  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  // TMA moves raw 16-bit words (no conversion); the MMAs read them as T.
  using G = uint16_t;
  using StrideK = Stride<int64_t, _1>;   // (rows, k): k contiguous
  using StrideMN = Stride<_1, int64_t>;  // (n, k): n contiguous
  using StrideB = conditional_t<kDx, StrideMN, StrideK>;
  template <class S>
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<G const*>(nullptr)), make_shape(int(0), int(0)), S{}));
  using GTensorD = decltype(make_tensor(make_gmem_ptr(static_cast<G*>(nullptr)), make_shape(int(0), int(0)), StrideK{}));
  using TmaA = decltype(make_tma_copy_A_sm90(SM90_TMA_LOAD{}, GTensor<StrideK>{}, SmemA{}(_, _, 0), Tile{}, Cluster{}));
  using TmaB = decltype(make_tma_copy_B_sm90(SM90_TMA_LOAD_MULTICAST{}, GTensor<StrideB>{}, SmemB{}(_, _, 0), Tile{},
                                             Cluster{}));
  using TmaD = decltype(make_tma_copy(SM90_TMA_STORE{}, GTensorD{}, SmemD{}));

  static constexpr uint32_t kTmaBytes = (128 + 256) * 64 * sizeof(G);  // one stage: A tile + the whole B tile

  struct Params {
    TmaA tma_a, tma_la;
    TmaB tma_b, tma_lb;
    TmaD tma_d;
    int M, N, Kred, R;
    TileGrid grid;
    const T* bias;
    Slices sl;
    int r;
    Dropout drop;
  };

  struct SharedStorage {
    alignas(1024) G A[cosize_v<SmemA>];
    alignas(1024) G B[cosize_v<SmemB>];
    alignas(1024) G D[2 * 2 * cosize_v<SmemD>];  // 2 consumer warpgroups x 2 buffers
    typename Pipeline::SharedStorage pipe;
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 232448, "exceeds the 227 KB of shared memory of an sm_90 block");

  // Low-rank K-blocks [lo, hi) of the tile whose first output column is n0.
  __device__ static void lowrank_range(Params const& p, int n0, int& lo, int& hi) {
    if constexpr (kDx) {
      lo = 0;
      hi = dx_lowrank_blocks(p.R, 64);
    } else {
      fwd_lowrank_blocks(p.sl, p.r, n0, 256, 64, lo, hi);
    }
  }

  __device__ static void tile_of(Params const& p, int unit, int cta_rank, int& mt, int& nt) {
    int mu = 0;
    unit_coord(p.grid, unit, mu, nt);
    mt = mu * 2 + cta_rank;
  }

  // ------------------------------------------------------------------------------------------ producer
  __device__ static void producer(Params const& p, SharedStorage& ss, Pipeline& pipeline, int cta_rank,
                                  int cluster_id, int num_clusters) {
    Tensor sA = make_tensor(make_smem_ptr(ss.A), SmemA{});
    Tensor sB = make_tensor(make_smem_ptr(ss.B), SmemB{});
    Tensor gA = local_tile(p.tma_a.get_tma_tensor(make_shape(p.M, p.Kred)), Shape<_128, _64>{}, make_coord(_, _));
    Tensor gB = local_tile(p.tma_b.get_tma_tensor(make_shape(p.N, p.Kred)), Shape<_256, _64>{}, make_coord(_, _));
    Tensor gLA = local_tile(p.tma_la.get_tma_tensor(make_shape(p.M, p.R)), Shape<_128, _64>{}, make_coord(_, _));
    Tensor gLB = local_tile(p.tma_lb.get_tma_tensor(make_shape(p.N, p.R)), Shape<_256, _64>{}, make_coord(_, _));
    // A is not multicast (each CTA has its own rows); B is split between the two CTAs and multicast to both.
    auto ta = p.tma_a.get_slice(0);
    auto tla = p.tma_la.get_slice(0);
    auto tb = p.tma_b.get_slice(cta_rank);
    auto tlb = p.tma_lb.get_slice(cta_rank);
    Tensor tAgA = ta.partition_S(gA);  // (TMA, TMA_M, TMA_K, m, k)
    Tensor tAsA = ta.partition_D(sA);  // (TMA, TMA_M, TMA_K, stage)
    Tensor tLgA = tla.partition_S(gLA);
    Tensor tLsA = tla.partition_D(sA);
    Tensor tBgB = tb.partition_S(gB);
    Tensor tBsB = tb.partition_D(sB);
    Tensor tLgB = tlb.partition_S(gLB);
    Tensor tLsB = tlb.partition_D(sB);
    const uint16_t mcast_b = 0x3;  // both CTAs of the cluster

    PipelineState st = cutlass::make_producer_start_state<Pipeline>();
    const int k_main = static_cast<int>(cdiv(p.Kred, 64));
    for (int unit = cluster_id; unit < p.grid.units; unit += num_clusters) {
      int mt = 0, nt = 0, lo = 0, hi = 0;
      tile_of(p, unit, cta_rank, mt, nt);
      lowrank_range(p, nt * 256, lo, hi);
      for (int kb = lo; kb < hi; ++kb) {
        pipeline.producer_acquire(st);
        uint64_t* bar = pipeline.producer_get_barrier(st);
        copy(p.tma_la.with(*bar), tLgA(_, _, _, mt, kb), tLsA(_, _, _, st.index()));
        copy(p.tma_lb.with(*bar, mcast_b), tLgB(_, _, _, nt, kb), tLsB(_, _, _, st.index()));
        ++st;
      }
      for (int kb = 0; kb < k_main; ++kb) {
        pipeline.producer_acquire(st);
        uint64_t* bar = pipeline.producer_get_barrier(st);
        copy(p.tma_a.with(*bar), tAgA(_, _, _, mt, kb), tAsA(_, _, _, st.index()));
        copy(p.tma_b.with(*bar, mcast_b), tBgB(_, _, _, nt, kb), tBsB(_, _, _, st.index()));
        ++st;
      }
    }
    // Do not exit while the peer CTA may still multicast into this CTA's stages or wait on our releases.
    pipeline.producer_tail(st);
  }

  // ------------------------------------------------------------------------------------------ consumers
  __device__ static void consumer(Params const& p, SharedStorage& ss, Pipeline& pipeline, int cta_rank,
                                  int cluster_id, int num_clusters) {
    const int ct = static_cast<int>(threadIdx.x) - 128;  // 0..255, the TiledMma's thread index
    const int wg = ct / 128;                              // consumer warpgroup: rows 64*wg .. 64*wg+63
    const int wg_thread = ct % 128;
    TiledMma mma;
    auto thr = mma.get_thread_slice(ct);
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<T*>(ss.A)), SmemA{});
    Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<T*>(ss.B)), SmemB{});
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // (MMA, MMA_M, MMA_K, stage) descriptors
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
    Tensor acc = partition_fragment_C(mma, take<0, 2>(Tile{}));  // ((2, 2, 32), 1, 1) fp32
    static_assert(decltype(size(acc))::value == Sm90Acc::kValues, "accumulator map of lora_plan.h");

    // Epilogue: this warpgroup's two 64 x 64 staging buffers and the TMA-store view of the output.
    G* dbase = ss.D + wg * 2 * cosize_v<SmemD>;
    Tensor gD = local_tile(p.tma_d.get_tma_tensor(make_shape(p.M, p.N)), Shape<_64, _64>{}, make_coord(_, _));
    auto td = p.tma_d.get_slice(0);
    Tensor tDgD = td.partition_D(gD);  // (TMA, TMA_M, TMA_N, m64, n64)
    int epi = 0;                        // sub-tiles this warpgroup has stored (buffer = epi % 2)

    FragKeep<Sm90Acc> keep, keep_next;
    const uint64_t seed = kDx ? load_seed(p.drop) : 0ull;
    const bool masked = kDx && p.drop.on;

    PipelineState rd;
    PipelineState rel;
    const int k_main = static_cast<int>(cdiv(p.Kred, 64));
    bool first = true;
    for (int unit = cluster_id; unit < p.grid.units; unit += num_clusters) {
      int mt = 0, nt = 0, lo = 0, hi = 0;
      tile_of(p, unit, cta_rank, mt, nt);
      lowrank_range(p, nt * 256, lo, hi);
      const int n_low = hi - lo, total = n_low + k_main;
      const int m0 = mt * 128, n0 = nt * 256;

      // Keep bits of the tile after this one (same cluster slot), computed one unit per main K-block.
      int next_unit = unit + num_clusters, nmt = 0, nnt = 0;
      const bool has_next = masked && next_unit < p.grid.units;
      if (has_next) tile_of(p, next_unit, cta_rank, nmt, nnt);
      if (masked) {
        if (first) keep.compute_all(ct, m0, n0, seed, p.drop.thr);
        keep_next.clear();
      }
      first = false;
      int next_units_done = 0;

      mma.accumulate_ = GMMA::ScaleOut::Zero;
      if (total == 0) clear(acc);
      bool pending = false;  // a wgmma batch in flight whose stage is not released yet
      for (int kb = 0; kb < total; ++kb) {
        auto token = pipeline.consumer_try_wait(rd);
        pipeline.consumer_wait(rd, token);
        const int stage = rd.index();
        warpgroup_fence_operand(acc);
        warpgroup_arrive();
        CUTE_UNROLL
        for (int kk = 0; kk < size<2>(tCrA); ++kk) {
          cute::gemm(mma, tCrA(_, _, kk, stage), tCrB(_, _, kk, stage), acc);
          mma.accumulate_ = GMMA::ScaleOut::One;
        }
        warpgroup_commit_batch();
        ++rd;
        if (masked && kb == n_low - 1) {
          // End of the low-rank phase: wait for it, release its stages, mask it, then go on with g W.
          warpgroup_wait<0>();
          warpgroup_fence_operand(acc);
          if (pending) {
            pipeline.consumer_release(rel);
            ++rel;
          }
          pipeline.consumer_release(rel);
          ++rel;
          pending = false;
          keep.apply(acc);
          warpgroup_fence_operand(acc);
        } else {
          if (has_next && kb >= n_low && next_units_done < FragKeep<Sm90Acc>::kUnits) {
            // Integer work for the next tile's mask while this wgmma runs.
            keep_next.compute_unit(next_units_done, ct, nmt * 128, nnt * 256, seed, p.drop.thr);
            ++next_units_done;
          }
          warpgroup_wait<1>();
          warpgroup_fence_operand(acc);
          if (pending) {
            pipeline.consumer_release(rel);
            ++rel;
          }
          pending = true;
        }
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      if (pending) {
        pipeline.consumer_release(rel);
        ++rel;
      }
      if (has_next) {
        for (; next_units_done < FragKeep<Sm90Acc>::kUnits; ++next_units_done)
          keep_next.compute_unit(next_units_done, ct, nmt * 128, nnt * 256, seed, p.drop.thr);
        keep = keep_next;
      }

      // ---- epilogue: (+ bias) -> T -> swizzled smem sub-tile -> TMA store, double-buffered per warpgroup.
      const int row_base = 16 * (wg_thread / 32) + (wg_thread % 32) / 4;  // row in the warpgroup's 64 rows
      const int col_base = 2 * (ct % 4);
      CUTE_UNROLL
      for (int s = 0; s < kSubTiles; ++s) {
        const int buf = epi & 1;
        Tensor sD = make_tensor(make_smem_ptr(reinterpret_cast<T*>(dbase + buf * cosize_v<SmemD>)), SmemD{});
        // The store issued from this buffer two sub-tiles ago must have finished reading it.
        if (wg_thread == 0) tma_store_wait<1>();
        cutlass::arch::NamedBarrier::arrive_and_wait(128, 1 + wg);
        CUTE_UNROLL
        for (int j = 0; j < 8; ++j) {  // 8-column blocks v2 = 8s + j of this sub-tile
          CUTE_UNROLL
          for (int v1 = 0; v1 < 2; ++v1) {
            const int i = 4 * (8 * s + j) + 2 * v1;  // values i, i+1: columns col, col+1 of one row
            const int row = row_base + 8 * v1, col = 8 * j + col_base;
            float a0 = acc(i), a1 = acc(i + 1);
            if constexpr (!kDx) {
              if (p.bias != nullptr) {
                const int n = n0 + 64 * s + col;
                if (n < p.N) a0 += static_cast<float>(p.bias[n]);
                if (n + 1 < p.N) a1 += static_cast<float>(p.bias[n + 1]);
              }
            }
            const T t0 = static_cast<T>(a0), t1 = static_cast<T>(a1);
            const uint32_t packed = static_cast<uint32_t>(t0.raw()) | (static_cast<uint32_t>(t1.raw()) << 16);
            *reinterpret_cast<uint32_t*>(&sD(row, col)) = packed;
          }
        }
        tma_store_fence();  // make the generic-proxy smem writes visible to the TMA (async proxy)
        cutlass::arch::NamedBarrier::arrive_and_wait(128, 1 + wg);
        if (wg_thread == 0) {
          Tensor sDg = make_tensor(make_smem_ptr(dbase + buf * cosize_v<SmemD>), SmemD{});
          copy(p.tma_d, td.partition_S(sDg), tDgD(_, _, _, (m0 + 64 * wg) / 64, (n0 + 64 * s) / 64));
          tma_store_arrive();
        }
        ++epi;
      }
    }
    if (wg_thread == 0) tma_store_wait<0>();
  }

  __device__ static void run(Params const& p) {
    extern __shared__ char smem_raw[];
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
    const int warp_group = cutlass::canonical_warp_group_idx();
    const int warp = cutlass::canonical_warp_idx_sync();

    if (threadIdx.x == 0) {
      prefetch_tma_descriptor(p.tma_a.get_tma_descriptor());
      prefetch_tma_descriptor(p.tma_b.get_tma_descriptor());
      prefetch_tma_descriptor(p.tma_la.get_tma_descriptor());
      prefetch_tma_descriptor(p.tma_lb.get_tma_descriptor());
      prefetch_tma_descriptor(p.tma_d.get_tma_descriptor());
    }

    typename Pipeline::Params pp;
    pp.transaction_bytes = kTmaBytes;
    pp.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    pp.is_leader = threadIdx.x == 0;  // the producer thread arms each stage's transaction count
    pp.num_consumers = kConsumerThreads;
    pp.num_producers = 1;
    Pipeline pipeline(ss.pipe, pp, Cluster{});

    // Both CTAs' barriers are initialized before either multicasts into the other.
    cute::cluster_arrive_relaxed();
    cute::cluster_wait();

    const int cta_rank = static_cast<int>(cute::block_rank_in_cluster());
    const int cluster_id = static_cast<int>(blockIdx.x) / 2, num_clusters = static_cast<int>(gridDim.x) / 2;
    if (warp_group == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (warp == 0 && threadIdx.x == 0) producer(p, ss, pipeline, cta_rank, cluster_id, num_clusters);
    } else {
      cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
      consumer(p, ss, pipeline, cta_rank, cluster_id, num_clusters);
    }
  }
};

template <class K>
__global__ void __launch_bounds__(K::kThreads, 1) gemm_kernel(CUTE_GRID_CONSTANT typename K::Params const p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  K::run(p);
#endif
}

// Host launcher: TMA descriptors, persistent grid of clusters, cluster launch.
template <class K>
cudaError_t launch(const GemmArgs& a, cudaStream_t stream) {
  using G = typename K::G;
  using Tile = typename K::Tile;
  using Cluster = typename K::Cluster;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  auto rows = [](const void* ptr, int r, int c, int64_t ld) {
    return make_tensor(make_gmem_ptr(static_cast<G const*>(ptr)), make_shape(r, c), make_stride(ld, _1{}));
  };
  auto cols = [](const void* ptr, int r, int c, int64_t ld) {  // (r, c) with r contiguous: element at ptr[c*ld + r]
    return make_tensor(make_gmem_ptr(static_cast<G const*>(ptr)), make_shape(r, c), make_stride(_1{}, ld));
  };
  auto b_tensor = [&](const void* ptr, int n, int k, int64_t ld) {
    if constexpr (K::kDx) {
      return cols(ptr, n, k, ld);
    } else {
      return rows(ptr, n, k, ld);
    }
  };
  // A zero-width low-rank operand still needs a valid descriptor: give it one column (never read).
  const int R = a.R > 0 ? a.R : 1;
  typename K::Params p{
      make_tma_copy_A_sm90(SM90_TMA_LOAD{}, rows(a.a, a.M, a.Kred, a.lda), typename K::SmemA{}(_, _, 0), Tile{},
                           Cluster{}),
      make_tma_copy_A_sm90(SM90_TMA_LOAD{}, rows(a.la, a.M, R, a.ldla), typename K::SmemA{}(_, _, 0), Tile{},
                           Cluster{}),
      make_tma_copy_B_sm90(SM90_TMA_LOAD_MULTICAST{}, b_tensor(a.b, a.N, a.Kred, a.ldb), typename K::SmemB{}(_, _, 0),
                           Tile{}, Cluster{}),
      make_tma_copy_B_sm90(SM90_TMA_LOAD_MULTICAST{}, b_tensor(a.lb, a.N, R, a.ldlb), typename K::SmemB{}(_, _, 0),
                           Tile{}, Cluster{}),
      make_tma_copy(SM90_TMA_STORE{},
                    make_tensor(make_gmem_ptr(static_cast<G*>(a.d)), make_shape(a.M, a.N), make_stride(a.ldd, _1{})),
                    typename K::SmemD{}),
      a.M,
      a.N,
      a.Kred,
      a.R,
      make_tile_grid(a.M, a.N, kSm90Tiles, kRasterGroup),
      static_cast<const typename K::T*>(a.bias),
      a.sl,
      a.r,
      a.drop};

  auto* kernel = &gemm_kernel<K>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmemBytes);
  if (err != cudaSuccess) return err;

  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.blockDim = dim3(K::kThreads, 1, 1);
  cfg.dynamicSmemBytes = K::kSmemBytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // As many clusters as can be resident at once (at most one CTA per SM: the pipeline takes ~225 KB).
  int max_clusters = 0;
  cfg.gridDim = dim3(2 * static_cast<unsigned>(a.sms / 2 > 0 ? a.sms / 2 : 1), 1, 1);
  if (cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg) != cudaSuccess || max_clusters <= 0) {
    (void)cudaGetLastError();
    max_clusters = a.sms / 2 > 0 ? a.sms / 2 : 1;
  }
  const int clusters = persistent_clusters(p.grid, max_clusters);
  cfg.gridDim = dim3(2 * static_cast<unsigned>(clusters), 1, 1);
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

}  // namespace sm90

}  // namespace lora_fused

// One explicit instantiation per translation unit (csrc/sm90_{fwd,dx}_{bf16,fp16}.cu).
#define LF_SM90_INSTANTIATE(DT, DX)                                                             \
  namespace lora_fused {                                                                                \
  template <>                                                                                           \
  cudaError_t gemm_sm90<DT, DX>(const GemmArgs& args, cudaStream_t stream) {                           \
    return sm90::launch<sm90::Gemm<ElementOf<DT>, DX>>(args, stream);                                   \
  }                                                                                                     \
  }
