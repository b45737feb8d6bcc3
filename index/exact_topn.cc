#include "index/exact_topn.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "index/distance.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvwave::index {
namespace {

constexpr int kTileQueries = 6;    // MR: queries per register tile
constexpr int kTileKeys = 16;      // NR: keys per register tile (two 8-float vectors)
constexpr int kBlockQueries = 96;  // queries scored together (16 tiles), one task of the TBB loop
// Keys per block: 512 keys of d = 128 are 256 KiB packed, and their scores for 96 queries
// 192 KiB, so a block's working set stays in a 1 MiB L2.
constexpr int64_t kBlockKeys = 512;

// A running top-N: every score above the threshold goes into a buffer; when it holds 2N, the N
// best are selected (nth_element) and the N-th best score becomes the threshold, so a score costs
// O(1) amortised (a heap would sift on every replacement, and replacements are frequent when the
// keys' scores drift with position). Order: higher score first, then lower key index. An item is
// one integer, (order-preserving bits of the score) << 32 | ~key, larger = better, so selection
// and sorting compare integers (a comparator on (float, index) pairs, with its tie-break and NaN
// branches, took more CPU than the dot products: perf on dd16k, bench/results/graph_build_s12_*).
class RunningTopN {
 public:
  void Reset(int nn) {
    nn_ = nn;
    items_.clear();
    items_.reserve(2 * static_cast<size_t>(nn) + 1);
    threshold_ = -std::numeric_limits<float>::infinity();
  }

  // Offers scores[0, count) of keys first + 0, first + 1, ... in increasing key order, so a score
  // equal to the threshold never beats the lower key that set it.
  void Offer(const float* scores, int64_t count, int64_t first) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
      const __m256 block = _mm256_loadu_ps(scores + i);
      int mask = _mm256_movemask_ps(_mm256_cmp_ps(block, _mm256_set1_ps(threshold_), _CMP_GT_OQ));
      while (mask != 0) {
        const int64_t j = i + __builtin_ctz(static_cast<unsigned>(mask));
        mask &= mask - 1;
        Take(scores[j], first + j);
      }
    }
    for (; i < count; ++i) Take(scores[i], first + i);
  }

  // Writes the best min(N, offered) keys best first and empties the buffer.
  void Drain(int32_t* out) {
    if (static_cast<int>(items_.size()) > nn_) Compact();
    std::sort(items_.begin(), items_.end(), std::greater<uint64_t>());
    for (size_t r = 0; r < items_.size(); ++r) out[r] = KeyOf(items_[r]);
    items_.clear();
  }

 private:
  // Order-preserving bits of a float (NaN aside; -0 is taken as +0, as the float comparison would).
  static uint32_t Ordered(float f) {
    uint32_t u;
    f += 0.0f;  // -0 -> +0
    std::memcpy(&u, &f, 4);
    return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
  }
  static float ScoreOf(uint64_t item) {
    const uint32_t o = static_cast<uint32_t>(item >> 32);
    const uint32_t u = (o & 0x80000000u) != 0 ? o & 0x7fffffffu : ~o;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static int32_t KeyOf(uint64_t item) { return static_cast<int32_t>(~static_cast<uint32_t>(item)); }
  void Take(float score, int64_t key) {
    if (!(score > threshold_)) return;  // also drops NaN
    items_.push_back(uint64_t{Ordered(score)} << 32 | ~static_cast<uint32_t>(key));
    if (items_.size() >= 2 * static_cast<size_t>(nn_)) Compact();
  }
  void Compact() {
    std::nth_element(items_.begin(), items_.begin() + (nn_ - 1), items_.end(),
                     std::greater<uint64_t>());
    items_.resize(static_cast<size_t>(nn_));
    threshold_ = ScoreOf(items_[nn_ - 1]);  // the N-th best: every later key must beat it
  }

  int nn_ = 0;
  std::vector<uint64_t> items_;
  float threshold_ = 0;
};

// Keys packed in panels of kTileKeys, dimension-major: panel p holds keys [16p, 16p + 16) as
// packed[(p * d + j) * 16 + t] = key (16p + t), dimension j; keys past n are zeros.
std::vector<float> PackKeys(const float* keys, int64_t n, int d) {
  const int64_t panels = (n + kTileKeys - 1) / kTileKeys;
  std::vector<float> packed(static_cast<size_t>(panels * d * kTileKeys), 0.0f);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, panels, 64), [&](const auto& range) {
    for (int64_t p = range.begin(); p < range.end(); ++p) {
      float* panel = packed.data() + p * d * kTileKeys;
      const int64_t count = std::min<int64_t>(kTileKeys, n - p * kTileKeys);
      for (int64_t t = 0; t < count; ++t) {
        const float* key = keys + (p * kTileKeys + t) * d;
        for (int j = 0; j < d; ++j) panel[j * kTileKeys + t] = key[j];
      }
    }
  });
  return packed;
}

// Queries [first, first + count) packed in tiles of kTileQueries, dimension-major like the keys;
// rows past count are zeros. out holds kBlockQueries * d floats.
void PackQueries(const float* queries, int64_t first, int count, int d, float* out) {
  std::fill_n(out, size_t{kBlockQueries} * d, 0.0f);
  for (int i = 0; i < count; ++i) {
    const float* q = queries + (first + i) * d;
    float* tile = out + (i / kTileQueries) * d * kTileQueries;
    for (int j = 0; j < d; ++j) tile[j * kTileQueries + i % kTileQueries] = q[j];
  }
}

// scores[r * ld + t] = query r of the tile . key t of the panel, r < 6, t < 16: 12 accumulators,
// per dimension 2 key loads, 6 broadcasts and 12 FMAs.
void Tile6x16(const float* q_tile, const float* panel, int d, float* scores, int64_t ld) {
  __m256 acc[kTileQueries][2];
  for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
  for (int j = 0; j < d; ++j) {
    const __m256 k0 = _mm256_loadu_ps(panel + j * kTileKeys);
    const __m256 k1 = _mm256_loadu_ps(panel + j * kTileKeys + 8);
    const float* q = q_tile + j * kTileQueries;
    for (int r = 0; r < kTileQueries; ++r) {
      const __m256 a = _mm256_broadcast_ss(q + r);
      acc[r][0] = _mm256_fmadd_ps(a, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < kTileQueries; ++r) {
    _mm256_storeu_ps(scores + r * ld, acc[r][0]);
    _mm256_storeu_ps(scores + r * ld + 8, acc[r][1]);
  }
}

// Two consecutive query tiles (12 queries) against one panel with AVX-512: per dimension one key
// load (the panel's 16 keys are one vector), 12 broadcasts and 12 FMAs. Each score is the same
// chain of FMAs over the dimensions in order as Tile6x16's, so both give the same bits; on a core
// with full-width AVX-512 units this does twice the FMAs per cycle. Rows of the second tile follow
// the first's in `scores` (ld apart, as two Tile6x16 calls would write them).
__attribute__((target("avx512f"))) void Tile12x16Avx512(const float* q_tiles, const float* panel,
                                                        int d, float* scores, int64_t ld) {
  constexpr int kRows = 2 * kTileQueries;
  __m512 acc[kRows];
  for (__m512& a : acc) a = _mm512_setzero_ps();
  const float* q1 = q_tiles + int64_t{d} * kTileQueries;
  for (int j = 0; j < d; ++j) {
    const __m512 k = _mm512_loadu_ps(panel + j * kTileKeys);
    const float* qa = q_tiles + j * kTileQueries;
    const float* qb = q1 + j * kTileQueries;
    for (int r = 0; r < kTileQueries; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qa[r]), k, acc[r]);
      acc[kTileQueries + r] = _mm512_fmadd_ps(_mm512_set1_ps(qb[r]), k, acc[kTileQueries + r]);
    }
  }
  for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(scores + r * ld, acc[r]);
}

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

absl::Status CheckArgs(int64_t n, int64_t m, int d, int nn) {
  if (n < 1 || m < 1 || d < 1 || nn < 1 || nn > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("exact top-N: need n, m, d >= 1 and 1 <= N <= n (n=", n, " m=", m, " d=", d,
                     " N=", nn, ")"));
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("exact top-N: more than 2^31 keys");
  }
  return absl::OkStatus();
}

// out[h * n + i] = qs[h] . keys[i] for 4 queries, 4 keys at a time (the rowwise method's kernel).
// REQUIRES: d % 8 == 0.
void DotBlock4(const float* qs, const float* keys, int64_t n, int d, float* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256 acc[4][4];
    for (auto& row : acc) {
      for (auto& a : row) a = _mm256_setzero_ps();
    }
    for (int j = 0; j < d; j += 8) {
      __m256 k[4], q[4];
      for (int r = 0; r < 4; ++r) k[r] = _mm256_loadu_ps(keys + (i + r) * d + j);
      for (int h = 0; h < 4; ++h) q[h] = _mm256_loadu_ps(qs + h * d + j);
      for (int h = 0; h < 4; ++h) {
        for (int r = 0; r < 4; ++r) acc[h][r] = _mm256_fmadd_ps(q[h], k[r], acc[h][r]);
      }
    }
    for (int h = 0; h < 4; ++h) {
      __m256 s01 = _mm256_hadd_ps(acc[h][0], acc[h][1]);
      __m256 s23 = _mm256_hadd_ps(acc[h][2], acc[h][3]);
      __m256 s = _mm256_hadd_ps(s01, s23);
      __m128 sum = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      _mm_storeu_ps(out + h * n + i, sum);
    }
  }
  for (; i < n; ++i) {
    for (int h = 0; h < 4; ++h) out[h * n + i] = Dot(qs + h * d, keys + i * d, d);
  }
}

}  // namespace

absl::Status ExactTopN(const float* keys, int64_t n, const float* queries, int64_t m, int d, int nn,
                       int32_t* out) {
  if (absl::Status s = CheckArgs(n, m, d, nn); !s.ok()) return s;
  const std::vector<float> packed = PackKeys(keys, n, d);
  const int64_t blocks = (m + kBlockQueries - 1) / kBlockQueries;
  const bool wide = HasAvx512();
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, blocks, 1), [&](const auto& range) {
    std::vector<float> q_packed(size_t{kBlockQueries} * d);
    std::vector<float> scores(static_cast<size_t>(kBlockQueries * kBlockKeys));
    std::vector<RunningTopN> tops(kBlockQueries);
    for (int64_t b = range.begin(); b < range.end(); ++b) {
      const int64_t first = b * kBlockQueries;
      const int count = static_cast<int>(std::min<int64_t>(kBlockQueries, m - first));
      const int tiles = (count + kTileQueries - 1) / kTileQueries;
      PackQueries(queries, first, count, d, q_packed.data());
      for (int i = 0; i < count; ++i) tops[i].Reset(nn);
      for (int64_t k0 = 0; k0 < n; k0 += kBlockKeys) {
        const int64_t keys_here = std::min(kBlockKeys, n - k0);
        const int64_t panels = (keys_here + kTileKeys - 1) / kTileKeys;
        for (int64_t p = 0; p < panels; ++p) {  // one key panel stays in L1 for every tile
          const float* panel = packed.data() + (k0 / kTileKeys + p) * d * kTileKeys;
          int t = 0;
          if (wide) {
            for (; t + 2 <= tiles; t += 2) {
              Tile12x16Avx512(
                  q_packed.data() + int64_t{t} * d * kTileQueries, panel, d,
                  scores.data() + int64_t{t} * kTileQueries * kBlockKeys + p * kTileKeys,
                  kBlockKeys);
            }
          }
          for (; t < tiles; ++t) {
            Tile6x16(q_packed.data() + int64_t{t} * d * kTileQueries, panel, d,
                     scores.data() + int64_t{t} * kTileQueries * kBlockKeys + p * kTileKeys,
                     kBlockKeys);
          }
        }
        for (int i = 0; i < count; ++i) {
          tops[i].Offer(scores.data() + int64_t{i} * kBlockKeys, keys_here, k0);
        }
      }
      for (int i = 0; i < count; ++i) tops[i].Drain(out + (first + i) * nn);
    }
  });
  return absl::OkStatus();
}

absl::Status ExactTopNRowwise(const float* keys, int64_t n, const float* queries, int64_t m, int d,
                              int nn, int32_t* out) {
  if (absl::Status s = CheckArgs(n, m, d, nn); !s.ok()) return s;
  constexpr int kBlock = 16;
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, blocks, 1), [&](const auto& range) {
    std::vector<float> qs(size_t{kBlock} * d, 0.0f), scores(static_cast<size_t>(kBlock * n));
    RunningTopN top;
    for (int64_t b = range.begin(); b < range.end(); ++b) {
      const int64_t first = b * kBlock;
      const int count = static_cast<int>(std::min<int64_t>(kBlock, m - first));
      std::copy_n(queries + first * d, int64_t{count} * d, qs.data());
      if (d % 8 == 0) {
        for (int i = 0; i < count; i += 4) {  // rows past `count` are stale but unused
          DotBlock4(qs.data() + int64_t{i} * d, keys, n, d, scores.data() + i * n);
        }
      } else {
        DotRowsMulti(qs.data(), count, keys, n, d, scores.data());
      }
      for (int i = 0; i < count; ++i) {
        top.Reset(nn);
        top.Offer(scores.data() + i * n, n, 0);
        top.Drain(out + (first + i) * nn);
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace kvwave::index
