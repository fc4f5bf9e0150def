// Host-side checks of the planning and index logic shared by the binding and the kernels (lora_plan.h) and of
// the dropout mask arithmetic (lora_philox.cuh), compiled with the plain host C++ compiler and run on the CPU by
// tests/test_cuda_host.py. Prints "all N checks passed" and exits 0, or prints each failure and exits 1.
//
//   c++ -std=c++17 -O1 -I csrc csrc/tests/test_plan.cpp -o test_plan && ./test_plan
#include <cstdio>
#include <cstdlib>
#include <set>
#include <utility>
#include <vector>

#include "check.h"
#include "lora_philox.cuh"
#include "lora_plan.h"

using namespace lora_fused;

static Slices make_slices(std::vector<std::pair<int, int>> s) {
  Slices sl{};
  sl.ntgt = static_cast<int>(s.size());
  int boff = 0;
  for (int t = 0; t < sl.ntgt; ++t) {
    sl.off[t] = s[t].first;
    sl.cnt[t] = s[t].second;
    sl.boff[t] = boff;
    boff += s[t].second;
  }
  return sl;
}

// ---------------------------------------------------------------------------------------------- tile order
static void test_tile_grid() {
  const int64_t shapes[][2] = {{1, 1},       {128, 256},   {129, 257},  {16384, 4096}, {1576, 2304},
                               {300, 64},    {5000, 8000}, {256, 4096}, {4096, 256},   {2, 100000}};
  for (const GemmTiles tiles : {kSm90Tiles, kSm80Tiles}) {
    for (auto& s : shapes) {
      for (int group : {1, 3, 8, 1000}) {
        const TileGrid g = make_tile_grid(s[0], s[1], tiles, group);
        CHECK(g.m_tiles == cdiv(s[0], tiles.bm) && g.n_tiles == cdiv(s[1], tiles.bn), "M=%lld N=%lld",
              (long long)s[0], (long long)s[1]);
        CHECK(g.m_units * tiles.cluster_m >= g.m_tiles && (g.m_units - 1) * tiles.cluster_m < g.m_tiles, "units");
        CHECK(g.group >= 1 && g.group <= g.m_units, "group %d of %d unit rows", g.group, g.m_units);
        // unit_coord is a bijection onto (unit row, N tile) and walks M fastest inside each group
        std::set<std::pair<int, int>> seen;
        int prev_mu = -1, prev_n = -1;
        for (int u = 0; u < g.units; ++u) {
          int mu = -1, n = -1;
          unit_coord(g, u, mu, n);
          CHECK(mu >= 0 && mu < g.m_units && n >= 0 && n < g.n_tiles, "unit %d -> (%d, %d)", u, mu, n);
          seen.insert({mu, n});
          if (prev_mu >= 0 && mu / g.group == prev_mu / g.group) {
            // inside a group: the next unit is the next unit row of the same N tile, or the first row of the next
            const bool next_row = (mu == prev_mu + 1 && n == prev_n);
            const bool next_col = (n == prev_n + 1 && mu == (mu / g.group) * g.group);
            CHECK(next_row || next_col, "order (%d,%d) -> (%d,%d) group %d", prev_mu, prev_n, mu, n, g.group);
          }
          prev_mu = mu;
          prev_n = n;
        }
        CHECK(static_cast<int>(seen.size()) == g.units, "bijection: %zu of %d", seen.size(), g.units);
        for (int maxc : {1, 66, 132, 100000}) {
          const int c = persistent_clusters(g, maxc);
          CHECK(c >= 1 && c <= maxc && c <= (g.units > 0 ? g.units : 1), "clusters %d for %d units", c, g.units);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------- K-block switch
// Brute force: the rank columns the output columns [n0, n0+bn) of a tile use are those of every target that
// owns one of them; the low-rank K-blocks must cover them, start at the first and end after the last.
static void test_lowrank_blocks() {
  struct Case {
    int N, r;
    std::vector<std::pair<int, int>> s;
  };
  const std::vector<Case> cases = {
      {4096, 16, {{0, 4096}}},
      {256, 4, {{0, 256}}},
      {3 * 768, 16, {{0, 768}, {1536, 768}}},                 // q and v of an MHA qkv
      {3 * 768, 64, {{0, 768}, {768, 768}, {1536, 768}}},     // all three, R = 192: three K-blocks
      {2048 + 512, 128, {{0, 2048}, {2048, 256}, {2304, 256}}},  // GQA, R = 384
      {600, 8, {{40, 20}}},                                    // k only, not on a tile edge
      {512, 16, {{0, 0}, {256, 256}}},                         // an empty target
      {1024, 100, {{0, 300}, {700, 300}}},
  };
  for (const auto& c : cases) {
    const Slices sl = make_slices(c.s);
    const int R = sl.ntgt * c.r;
    for (const GemmTiles tiles : {kSm90Tiles, kSm80Tiles}) {
      for (int n0 = 0; n0 < c.N; n0 += tiles.bn) {
        int lo = -1, hi = -1;
        fwd_lowrank_blocks(sl, c.r, n0, tiles.bn, tiles.bk, lo, hi);
        int need_lo = 1 << 30, need_hi = -1;
        for (int n = n0; n < n0 + tiles.bn && n < c.N; ++n) {
          for (int t = 0; t < sl.ntgt; ++t) {
            if (n >= sl.off[t] && n < sl.off[t] + sl.cnt[t]) {
              need_lo = imin(need_lo, t * c.r);
              need_hi = imax(need_hi, (t + 1) * c.r - 1);
            }
          }
        }
        if (need_hi < 0) {
          CHECK(lo == hi, "tile n0=%d touches no target but runs blocks [%d, %d)", n0, lo, hi);
        } else {
          CHECK(lo == need_lo / tiles.bk && hi == need_hi / tiles.bk + 1,
                "n0=%d bk=%d r=%d: blocks [%d, %d), rank columns [%d, %d]", n0, tiles.bk, c.r, lo, hi, need_lo,
                need_hi);
          CHECK(hi * tiles.bk >= need_hi + 1 && hi <= cdiv(R, tiles.bk), "blocks within R");
        }
      }
    }
    CHECK(dx_lowrank_blocks(R, 64) == cdiv(R, 64) && dx_lowrank_blocks(R, 32) == cdiv(R, 32), "dx blocks");
  }
}

// ---------------------------------------------------------------------------------------------- alignment
static void test_alignment() {
  CHECK(rows_16b_aligned(0x1000, 4096, 1, 2), "contiguous bf16 rows");
  CHECK(rows_16b_aligned(0x1000, 8, 1, 2), "8 columns of 2 bytes");
  CHECK(!rows_16b_aligned(0x1000, 4100, 1, 2), "row stride not a multiple of 16 bytes");
  CHECK(!rows_16b_aligned(0x1002, 4096, 1, 2), "start not 16-byte aligned");
  CHECK(!rows_16b_aligned(0x1000, 1, 4096, 2), "column-major (transposed)");
  CHECK(rows_16b_aligned(0x1000, 8192, 1, 2), "a column slice of a wider tensor");
  for (int R = 1; R <= 400; ++R) {
    const int R8 = padded_rank_cols(R);
    CHECK(R8 >= R && R8 % 8 == 0 && R8 - R < 8, "R=%d R8=%d", R, R8);
  }
}

// ---------------------------------------------------------------------------------------------- small kernels
static void test_small_plans() {
  const int64_t Ms[] = {1, 63, 64, 65, 197, 1576, 4096, 16384, 100000};
  const int64_t Ks[] = {8, 64, 72, 768, 1000, 4096, 12288};
  for (int sms : {1, 108, 132}) {
    for (int64_t M : Ms) {
      for (int64_t K : Ks) {
        for (int R : {1, 4, 16, 17, 48, 64, 100, 128, 192, 384}) {
          const DownPlan d = plan_down(M, K, R, sms);
          CHECK(d.rb >= 16 && d.rb <= 128 && (d.rb & (d.rb - 1)) == 0, "rb %d", d.rb);
          CHECK(d.rb * d.r_blocks >= R && d.rb * (d.r_blocks - 1) < R, "rank blocks R=%d", R);
          CHECK(d.m_blocks * 64 >= M && (d.m_blocks - 1) * 64 < M, "row blocks");
          CHECK(d.k_per_split % kSmallChunk == 0 && d.splits >= 1, "split %d", d.k_per_split);
          CHECK(int64_t{d.splits} * d.k_per_split >= K && int64_t{d.splits - 1} * d.k_per_split < K,
                "splits cover K=%lld: %d x %d", (long long)K, d.splits, d.k_per_split);
          if (d.splits > 1) CHECK(int64_t{d.m_blocks} * d.r_blocks < 2 * sms, "split only when rows do not fill");

          const DaPlan a = plan_da(M, K, R, sms);
          CHECK(a.rb * a.ck == kSmallAccFloats && a.ck % kSmallChunk == 0, "da ck %d rb %d", a.ck, a.rb);
          CHECK(int64_t{a.k_blocks} * a.ck >= K && int64_t{a.k_blocks - 1} * a.ck < K, "da column blocks");
          CHECK(a.rm % kSmallRows == 0 && int64_t{a.m_blocks} * a.rm >= M && int64_t{a.m_blocks - 1} * a.rm < M,
                "da row blocks M=%lld rm=%d mb=%d", (long long)M, a.rm, a.m_blocks);
          CHECK(a.rb * a.r_blocks >= R, "da rank blocks");
        }
      }
      for (int r : {1, 4, 16, 33, 64, 128}) {
        for (auto s : std::vector<std::vector<std::pair<int, int>>>{
                 {{0, 4096}}, {{0, 768}, {1536, 768}}, {{0, 2048}, {2048, 256}, {2304, 256}}, {{40, 20}}, {{0, 0}, {8, 8}}}) {
          const Slices sl = make_slices(s);
          const DhDbPlan p = plan_dh_db(M, sl, r, sms);
          CHECK(p.rb >= r && p.rb * p.cn == kSmallAccFloats && p.cn % kSmallChunk == 0, "dh cn %d rb %d", p.cn, p.rb);
          CHECK(p.rm % kSmallRows == 0 && int64_t{p.m_blocks} * p.rm >= M && int64_t{p.m_blocks - 1} * p.rm < M,
                "dh row blocks");
          int total = 0, jmax = 0;
          for (int t = 0; t < sl.ntgt; ++t) {
            CHECK(int64_t{p.jb[t]} * p.cn >= sl.cnt[t] && int64_t{p.jb[t] - 1} * p.cn < (sl.cnt[t] > 0 ? sl.cnt[t] : 1),
                  "target %d columns", t);
            total += p.jb[t];
            jmax = imax(jmax, p.jb[t]);
          }
          CHECK(total == p.jb_total && jmax == p.jb_max, "column block totals");
          // dh_db_block enumerates (target, block) pairs in order, each once
          int j = 0;
          for (int t = 0; t < sl.ntgt; ++t) {
            for (int jt = 0; jt < p.jb[t]; ++jt, ++j) {
              int tt = -1, jj = -1;
              dh_db_block(p, j, tt, jj);
              CHECK(tt == t && jj == jt, "block %d -> (%d, %d), expected (%d, %d)", j, tt, jj, t, jt);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------- accumulators
template <class Acc>
static void test_acc_map(const char* name, int tile_m, int tile_n) {
  std::vector<int> hits(static_cast<size_t>(tile_m) * tile_n, 0);
  for (int t = 0; t < Acc::kThreads; ++t) {
    for (int i = 0; i < Acc::kValues; ++i) {
      const int row = Acc::row(t, i), col = Acc::col(t, i);
      CHECK(row >= 0 && row < tile_m && col >= 0 && col < tile_n, "%s t=%d i=%d -> (%d, %d)", name, t, i, row, col);
      if (row >= 0 && row < tile_m && col >= 0 && col < tile_n) ++hits[static_cast<size_t>(row) * tile_n + col];
      if (i % 2 == 0) {
        CHECK(Acc::row(t, i + 1) == row && Acc::col(t, i + 1) == col + 1 && col % 8 == 2 * (t % 4),
              "%s pair t=%d i=%d", name, t, i);
        // the four lanes of the quad hold the same (row, group) for this pair
        const int q0 = t - t % 4;
        for (int q = 0; q < 4; ++q) {
          CHECK(Acc::row(q0 + q, i) == row && Acc::col(q0 + q, i) / 8 == col / 8, "%s quad t=%d i=%d", name, t, i);
        }
      }
    }
  }
  int bad = 0;
  for (int h : hits) bad += h != 1;
  CHECK(bad == 0, "%s: %d tile elements not held exactly once", name, bad);
}

// The quad-shared fragment mask (FragKeep of lora_philox.cuh), simulated lane by lane with the same functions the
// device code calls, against the direct per-element decision.
template <class Acc>
static void test_frag_mask(const char* name, uint64_t seed, uint32_t thr, int row0, int col0) {
  for (int t = 0; t < Acc::kThreads; ++t) {
    uint32_t words[Acc::kPairs / 16] = {};
    const int q0 = t - t % 4;
    for (int u = 0; u < Acc::kPairs / 4; ++u) {
      uint32_t quad = 0u;  // what the two xor-shuffles leave in every lane: the OR of the four lanes' bytes
      for (int q = 0; q < 4; ++q) {
        int row = 0, grp = 0;
        mask_unit_group<Acc>(u, q0 + q, row0, col0, row, grp);
        quad |= keep8(seed, thr, row, grp) << (8 * q);
      }
      words[u / 4] |= mask_unit_select(quad, t & 3) << (8 * (u % 4));
    }
    for (int p = 0; p < Acc::kPairs; ++p) {
      const uint32_t b = pair_keep_bits(words, p);
      for (int v = 0; v < 2; ++v) {
        const int row = row0 + Acc::row(t, 2 * p + v), col = col0 + Acc::col(t, 2 * p + v);
        const uint32_t want = (keep8(seed, thr, row, col >> 3) >> (col & 7)) & 1u;
        CHECK(((b >> v) & 1u) == want, "%s t=%d value %d (%d, %d)", name, t, 2 * p + v, row, col);
      }
    }
  }
}

static void test_philox() {
  // Random123's known-answer vector for Philox-4x32-10: counter 0, key 0.
  const Words4 w = philox4x32_10(0, 0, 0, 0);
  CHECK(w.w[0] == 0x6627e8d5u && w.w[1] == 0xe169c58du && w.w[2] == 0xbc57ac4cu && w.w[3] == 0x9b00dbd8u,
        "philox(0, 0) = %08x %08x %08x %08x", w.w[0], w.w[1], w.w[2], w.w[3]);
  // keep8: bit i compares the i-th 16-bit draw with the threshold
  const uint64_t seed = 0x123456789ABCDEF0ull;
  const Words4 x = philox4x32_10(7, 11, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint32_t thr = 20000;
  uint32_t want = 0;
  for (int i = 0; i < 8; ++i) want |= (((x.w[i / 2] >> (16 * (i % 2))) & 0xFFFFu) >= thr ? 1u : 0u) << i;
  CHECK(keep8(seed, thr, 11, 7) == want, "keep8 %02x vs %02x", keep8(seed, thr, 11, 7), want);
  CHECK(keep8(seed, 0, 3, 5) == 0xFFu, "p = 0 keeps everything");
  // kept fraction near 1 - p over many groups
  int kept = 0, total = 0;
  for (int row = 0; row < 200; ++row)
    for (int g = 0; g < 50; ++g) {
      const uint32_t b = keep8(seed, 19661 /* p = 0.3 */, row, g);
      for (int i = 0; i < 8; ++i) kept += (b >> i) & 1u;
      total += 8;
    }
  const double frac = static_cast<double>(kept) / total;
  CHECK(frac > 0.68 && frac < 0.72, "kept fraction %.4f for p = 0.3", frac);
}

int main() {
  test_tile_grid();
  test_lowrank_blocks();
  test_alignment();
  test_small_plans();
  test_acc_map<Sm90Acc>("sm90", 128, 256);
  test_acc_map<Sm80Acc>("sm80", 128, 256);
  test_philox();
  test_frag_mask<Sm90Acc>("sm90 mask", 0x9E3779B97F4A7C15ull, 6554, 0, 0);
  test_frag_mask<Sm90Acc>("sm90 mask", 42, 32768, 384, 4096 + 256);
  test_frag_mask<Sm80Acc>("sm80 mask", 0x9E3779B97F4A7C15ull, 6554, 128, 512);
  test_frag_mask<Sm80Acc>("sm80 mask", 7, 60000, 0, 0);
  return check_summary();
}
