// The dropout mask: keep(row, col) is a pure function of (seed, row, col), so every kernel regenerates any
// tile's decisions without coordinating RNG offsets, and only x, h and the seed are saved for backward.
//
// Philox-4x32-10 (Salmon et al. 2011) with counter (col / 8, row, 0, 0) and key (seed_lo, seed_hi): its four
// 32-bit words are cut into eight 16-bit draws u_0..u_7 for columns 8*(col/8) + 0..7 (u_{2i} = low half of word
// i); keep = u >= thr with thr = round(p * 65536) clamped to 65535, so p is quantized to 1/65536 and one Philox
// call serves 8 elements.
//
// Everything but the warp shuffles compiles for the host too: csrc/tests/test_plan.cpp checks the Philox
// known-answer vector and the fragment mask scheme below on the CPU.
#pragma once

#include <cstdint>

#include "lora_plan.h"

namespace lora_fused {

// Dropout as the kernels see it. on == false: no dropout (seed unused, may be null).
struct Dropout {
  const int64_t* seed;  // one int64 on the device, read inside the kernels (no host sync)
  uint32_t thr;         // round(p * 65536), clamped to 65535
  float inv;            // 1 / (1 - p)
  bool on;
};

LF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Words4 {
  uint32_t w[4];
};

LF_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0u, c3 = 0u;
  LF_UNROLL
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Words4{{c0, c1, c2, c3}};
}

// Keep bits of one row's 8-column group `grp` (bit i: column 8*grp + i is kept).
LF_HD uint32_t keep8(uint64_t seed, uint32_t thr, int row, int grp) {
  const Words4 w = philox4x32_10(static_cast<uint32_t>(grp), static_cast<uint32_t>(row), static_cast<uint32_t>(seed),
                                 static_cast<uint32_t>(seed >> 32));
  uint32_t bits = 0u;
  LF_UNROLL
  for (int i = 0; i < 8; ++i) {
    const uint32_t u = (w.w[i >> 1] >> ((i & 1) * 16)) & 0xFFFFu;
    bits |= (u >= thr ? 1u : 0u) << i;
  }
  return bits;
}

// ----------------------------------------------------------------------------------------------- fragment masks
// Keep bits of an MMA accumulator fragment (Acc = Sm90Acc or Sm80Acc of lora_plan.h): 2 bits per pair of
// values, pair p in bits 2*(p%16), 2*(p%16)+1 of word p/16. The four lanes of a quad hold the same (row,
// 8-column group) for a given pair, each two of its columns; so each unit of four pairs costs ONE Philox call
// per lane (lane q computes pair 4u+q's group) and two shuffles that give every lane all four groups' bits:
// one Philox per 8 elements, as in the loaders, instead of one per 2.

// The (row, 8-column group) of the Philox call that thread t makes for unit u (its quad lane q = t % 4 takes
// pair 4u + q), for the tile whose first element is (row0, col0), col0 % 8 == 0.
template <class Acc>
LF_HD void mask_unit_group(int u, int t, int row0, int col0, int& row, int& grp) {
  const int i = 2 * (4 * u + (t & 3));
  row = row0 + Acc::row(t, i);
  grp = (col0 + Acc::col(t, i)) >> 3;
}

// `quad_word` holds, in byte o, the 8 keep bits that lane o computed (pair 4u + o). Lane q's two columns of
// every pair are bits 2q and 2q+1 of that byte: returns them packed, pair 4u + o in bits 2o, 2o+1.
LF_HD uint32_t mask_unit_select(uint32_t quad_word, int q) {
  uint32_t mine = 0u;
  LF_UNROLL
  for (int o = 0; o < 4; ++o) mine |= ((quad_word >> (8 * o + 2 * q)) & 3u) << (2 * o);
  return mine;
}

// The two keep bits (bit 0: value 2p, bit 1: value 2p+1) of pair p in the fragment's words.
LF_HD uint32_t pair_keep_bits(const uint32_t* words, int p) { return (words[p / 16] >> (2 * (p % 16))) & 3u; }

#if defined(__CUDACC__)

template <class Acc>
struct FragKeep {
  static constexpr int kWords = Acc::kPairs / 16;
  static constexpr int kUnits = Acc::kPairs / 4;
  uint32_t w[kWords];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = 0u;
  }

  // Unit u of the fragment of thread t (its index inside the MMA's threads). u may be a run-time value: the
  // word is chosen by a select chain, never by a run-time array index. Every lane of the warp must call it with
  // the same u.
  __device__ __forceinline__ void compute_unit(int u, int t, int row0, int col0, uint64_t seed, uint32_t thr) {
    int row = 0, grp = 0;
    mask_unit_group<Acc>(u, t, row0, col0, row, grp);
    uint32_t word = keep8(seed, thr, row, grp) << (8 * (t & 3));
    word |= __shfl_xor_sync(0xFFFFFFFFu, word, 1);
    word |= __shfl_xor_sync(0xFFFFFFFFu, word, 2);
    const uint32_t v = mask_unit_select(word, t & 3) << (8 * (u & 3));
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] |= ((u >> 2) == k) ? v : 0u;
  }

  __device__ __forceinline__ void compute_all(int t, int row0, int col0, uint64_t seed, uint32_t thr) {
    clear();
#pragma unroll 1
    for (int u = 0; u < kUnits; ++u) compute_unit(u, t, row0, col0, seed, thr);
  }

  // acc(i) = 0 where dropped; the 1/(1-p) is already in the operand (dh' = dh / (1-p)).
  template <class Frag>
  __device__ __forceinline__ void apply(Frag& acc) const {
#pragma unroll
    for (int p = 0; p < Acc::kPairs; ++p) {
      const uint32_t b = pair_keep_bits(w, p);
      acc(2 * p) = (b & 1u) ? acc(2 * p) : 0.f;
      acc(2 * p + 1) = (b & 2u) ? acc(2 * p + 1) : 0.f;
    }
  }
};

__device__ __forceinline__ uint64_t load_seed(const Dropout& d) {
  return d.on ? static_cast<uint64_t>(__ldg(d.seed)) : 0ull;
}

#endif  // __CUDACC__

}  // namespace lora_fused
