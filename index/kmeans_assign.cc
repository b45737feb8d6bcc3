#include "index/kmeans_assign.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"

namespace kvwave::index {
namespace {

constexpr int kWidth = CentroidPanels::kWidth;
constexpr int kMicroRows = 6;               // vectors per micro-kernel call (12 accumulators)
constexpr int kBlockRows = 8 * kMicroRows;  // vectors per TBB task; they share each panel
constexpr int64_t kSerialWork = int64_t{1}
                                << 18;  // below this n*C*d, threads cost more than they save

// Running argmax state of one block: per vector, the best score and centroid of each lane.
struct alignas(32) BlockBest {
  float score[kBlockRows][kWidth];
  int32_t index[kBlockRows][kWidth];
};

// scores[m][lane] = rows[m] . panel lane, for M vectors of d floats. Each lane sums over k in
// order, so a vector's scores are bit-identical whichever micro-block (or caller) it lands in.
// Kept out of line so its 12 accumulators + 2 panel rows + 1 broadcast own the 16 ymm registers
// (inlined, GCC hoisted the caller's constants into registers and spilled an accumulator: 4x
// slower).
template <int M>
__attribute__((noinline)) void MicroKernel(const float* const* rows, int d, const float* panel,
                                           float (*scores)[kWidth]) {
  const float* x[M];
#pragma GCC unroll 6
  for (int m = 0; m < M; ++m) x[m] = rows[m];
  __m256 acc[M][2];
#pragma GCC unroll 6
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int k = 0; k < d; ++k) {
    const __m256 p0 = _mm256_loadu_ps(panel + k * kWidth);
    const __m256 p1 = _mm256_loadu_ps(panel + k * kWidth + 8);
#pragma GCC unroll 6
    for (int m = 0; m < M; ++m) {
      const __m256 b = _mm256_broadcast_ss(x[m] + k);
      acc[m][0] = _mm256_fmadd_ps(b, p0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(b, p1, acc[m][1]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < M; ++m) {
    _mm256_store_ps(scores[m], acc[m][0]);
    _mm256_store_ps(scores[m] + 8, acc[m][1]);
  }
}

// The same with AVX-512, where the CPU has it: a panel's 16 lanes are one vector, so a row takes
// one accumulator and one FMA per k instead of two. Each lane is the same chain of FMAs over k,
// so the scores are the same bits.
template <int M>
__attribute__((noinline, target("avx512f"))) void MicroKernel512(const float* const* rows, int d,
                                                                 const float* panel,
                                                                 float (*scores)[kWidth]) {
  static_assert(kWidth == 16);
  const float* x[M];
#pragma GCC unroll 6
  for (int m = 0; m < M; ++m) x[m] = rows[m];
  __m512 acc[M];
#pragma GCC unroll 6
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int k = 0; k < d; ++k) {
    const __m512 p = _mm512_loadu_ps(panel + k * kWidth);
#pragma GCC unroll 6
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m][k]), p, acc[m]);
  }
#pragma GCC unroll 6
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(scores[m], acc[m]);
}

bool HasAvx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// Folds one panel's scores of M vectors into their running best (rows `row`.. of `best`).
// `valid[h]` masks the lanes that hold real centroids.
template <int M>
inline void UpdateBest(const float (*scores)[kWidth], const __m256 (&valid)[2],
                       const __m256i (&lane_index)[2], int row, BlockBest& best) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int m = 0; m < M; ++m) {
    for (int h = 0; h < 2; ++h) {
      float* score = &best.score[row + m][h * 8];
      int32_t* index = &best.index[row + m][h * 8];
      const __m256 s = _mm256_blendv_ps(neg_inf, _mm256_load_ps(scores[m] + h * 8), valid[h]);
      const __m256 old = _mm256_load_ps(score);
      const __m256 gt = _mm256_cmp_ps(s, old, _CMP_GT_OQ);
      _mm256_store_ps(score, _mm256_blendv_ps(old, s, gt));
      const __m256 idx = _mm256_blendv_ps(_mm256_load_ps(reinterpret_cast<float*>(index)),
                                          _mm256_castsi256_ps(lane_index[h]), gt);
      _mm256_store_ps(reinterpret_cast<float*>(index), idx);
    }
  }
}

template <int M>
inline void ScoreMicroBlock(const float* x, int d, const float* panel, const __m256 (&valid)[2],
                            const __m256i (&lane_index)[2], int row, BlockBest& best) {
  alignas(32) float scores[M][kWidth];
  const float* rows[M];
  for (int m = 0; m < M; ++m) rows[m] = x + int64_t{m} * d;
  if (HasAvx512()) {
    MicroKernel512<M>(rows, d, panel, scores);
  } else {
    MicroKernel<M>(rows, d, panel, scores);
  }
  UpdateBest<M>(scores, valid, lane_index, row, best);
}

// Dispatches a micro-block of `rows` (1..kMicroRows) vectors to its compile-time kernel.
void ScoreRows(int rows, const float* x, int d, const float* panel, const __m256 (&valid)[2],
               const __m256i (&lane_index)[2], int row, BlockBest& best) {
  switch (rows) {
    case 6:
      return ScoreMicroBlock<6>(x, d, panel, valid, lane_index, row, best);
    case 5:
      return ScoreMicroBlock<5>(x, d, panel, valid, lane_index, row, best);
    case 4:
      return ScoreMicroBlock<4>(x, d, panel, valid, lane_index, row, best);
    case 3:
      return ScoreMicroBlock<3>(x, d, panel, valid, lane_index, row, best);
    case 2:
      return ScoreMicroBlock<2>(x, d, panel, valid, lane_index, row, best);
    default:
      return ScoreMicroBlock<1>(x, d, panel, valid, lane_index, row, best);
  }
}

// Reduces the kWidth lanes of one vector: highest score, lowest centroid index among ties.
void FinishRow(const BlockBest& best, int row, int32_t* assignment, float* best_score) {
  float s = best.score[row][0];
  int32_t c = best.index[row][0];
  for (int lane = 1; lane < kWidth; ++lane) {
    const float t = best.score[row][lane];
    const int32_t j = best.index[row][lane];
    if (t > s || (t == s && j < c)) s = t, c = j;
  }
  *assignment = c;
  if (best_score != nullptr) *best_score = s;
}

// Assigns vectors [begin, end), at most kBlockRows of them.
void AssignBlock(const float* x, int64_t begin, int64_t end, const CentroidPanels& panels,
                 int32_t* assignment, float* best_score) {
  const int d = panels.d();
  const int rows = static_cast<int>(end - begin);
  BlockBest best;
  std::fill(&best.score[0][0], &best.score[0][0] + kBlockRows * kWidth,
            -std::numeric_limits<float>::infinity());
  std::memset(best.index, 0, sizeof(best.index));
  const float* xb = x + begin * d;
  for (int p = 0; p < panels.num_panels(); ++p) {
    const int lanes = std::min(kWidth, panels.num_centroids() - p * kWidth);
    __m256 valid[2];
    __m256i lane_index[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i first = _mm256_set1_epi32(h * 8);
      valid[h] = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_add_epi32(lane, first)));
      lane_index[h] = _mm256_add_epi32(lane, _mm256_set1_epi32(p * kWidth + h * 8));
    }
    for (int r = 0; r < rows; r += kMicroRows) {
      ScoreRows(std::min(kMicroRows, rows - r), xb + int64_t{r} * d, d, panels.panel(p), valid,
                lane_index, r, best);
    }
  }
  for (int r = 0; r < rows; ++r) {
    FinishRow(best, r, assignment + begin + r, best_score ? best_score + begin + r : nullptr);
  }
}

// Masks lanes at or past `lanes` (centroids that do not exist) to -infinity, which never wins.
inline void MaskLanes(int lanes, __m256* lo, __m256* hi) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i count = _mm256_set1_epi32(lanes);
  *lo = _mm256_blendv_ps(neg_inf, *lo, _mm256_castsi256_ps(_mm256_cmpgt_epi32(count, lane)));
  *hi = _mm256_blendv_ps(
      neg_inf, *hi,
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(count, _mm256_add_epi32(lane, _mm256_set1_epi32(8)))));
}

// One step of a top-two reduction: each lane holds a pair (first >= second); merges it with the
// pair of the lane that `Permute` brings to it.
template <typename Permute>
inline void MergeTopTwo(__m256* first, __m256* second, Permute permute) {
  const __m256 other_first = permute(*first), other_second = permute(*second);
  *second = _mm256_max_ps(_mm256_min_ps(*first, other_first), _mm256_max_ps(*second, other_second));
  *first = _mm256_max_ps(*first, other_first);
}

// Top two of one vector's 16 lane scores: the best (lowest lane among ties) and the best of the
// other lanes (equal to the best on a tie). Branch-free: a min/max network over the lanes.
PanelTop2 ReducePanel(const float* scores, int lanes, int32_t first_centroid) {
  __m256 lo = _mm256_load_ps(scores), hi = _mm256_load_ps(scores + 8);
  if (lanes < kWidth) MaskLanes(lanes, &lo, &hi);
  __m256 first = _mm256_max_ps(lo, hi), second = _mm256_min_ps(lo, hi);
  MergeTopTwo(&first, &second, [](__m256 v) { return _mm256_permute2f128_ps(v, v, 1); });
  MergeTopTwo(&first, &second, [](__m256 v) { return _mm256_shuffle_ps(v, v, 0b01001110); });
  MergeTopTwo(&first, &second, [](__m256 v) { return _mm256_shuffle_ps(v, v, 0b10110001); });
  const unsigned ties =
      static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(lo, first, _CMP_EQ_OQ))) |
      (static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(hi, first, _CMP_EQ_OQ))) << 8);
  PanelTop2 top;
  top.best = _mm256_cvtss_f32(first);
  top.second = _mm256_cvtss_f32(second);
  top.index = first_centroid + (ties == 0 ? 0 : __builtin_ctz(ties));  // 0 only for NaN input
  return top;
}

// Scores up to kMicroRows listed vectors against panel p and reduces each to its top two.
template <int M>
void ScoreListed(const float* const* rows, const int64_t* ids, const CentroidPanels& panels, int p,
                 PanelTop2* out) {
  alignas(32) float scores[M][kWidth];
  MicroKernel<M>(rows, panels.d(), panels.panel(p), scores);
  const int lanes = std::min(kWidth, panels.num_centroids() - p * kWidth);
  for (int m = 0; m < M; ++m) {
    out[ids[m] * panels.num_panels() + p] = ReducePanel(scores[m], lanes, p * kWidth);
  }
}

void ScoreListedRows(int rows, const float* const* x, const int64_t* ids,
                     const CentroidPanels& panels, int p, PanelTop2* out) {
  switch (rows) {
    case 6:
      return ScoreListed<6>(x, ids, panels, p, out);
    case 5:
      return ScoreListed<5>(x, ids, panels, p, out);
    case 4:
      return ScoreListed<4>(x, ids, panels, p, out);
    case 3:
      return ScoreListed<3>(x, ids, panels, p, out);
    case 2:
      return ScoreListed<2>(x, ids, panels, p, out);
    default:
      return ScoreListed<1>(x, ids, panels, p, out);
  }
}

// ScorePanels over vectors [begin, end): per panel, the block's vectors that need it are listed
// and scored kMicroRows at a time (the block's rows stay in L1 across panels).
void ScorePanelsBlock(const float* x, int64_t begin, int64_t end, const CentroidPanels& panels,
                      const uint64_t* need, PanelTop2* out) {
  const int num_panels = panels.num_panels();
  const int words = PanelMaskWords(num_panels);
  const int d = panels.d();
  const float* rows[kBlockRows];
  int64_t ids[kBlockRows];
  for (int p = 0; p < num_panels; ++p) {
    int listed = 0;
    for (int64_t i = begin; i < end; ++i) {
      if (((need[i * words + p / 64] >> (p % 64)) & 1) == 0) continue;
      rows[listed] = x + i * d;
      ids[listed++] = i;
    }
    for (int r = 0; r < listed; r += kMicroRows) {
      ScoreListedRows(std::min(kMicroRows, listed - r), rows + r, ids + r, panels, p, out);
    }
  }
}

}  // namespace

void CentroidPanels::Pack(const float* centroids, int num_centroids, int d) {
  num_centroids_ = num_centroids;
  d_ = d;
  data_.assign(static_cast<size_t>(num_panels()) * d * kWidth, 0.0f);
  for (int c = 0; c < num_centroids; ++c) {
    float* dst = data_.data() + int64_t{c / kWidth} * d * kWidth + c % kWidth;
    const float* src = centroids + int64_t{c} * d;
    for (int k = 0; k < d; ++k) dst[int64_t{k} * kWidth] = src[k];
  }
}

void AssignMaxInnerProduct(const float* x, int64_t n, const CentroidPanels& panels,
                           int32_t* assignment, float* best_score, bool parallel) {
  const int64_t num_blocks = (n + kBlockRows - 1) / kBlockRows;
  auto run = [&](int64_t first_block, int64_t last_block) {
    for (int64_t b = first_block; b < last_block; ++b) {
      AssignBlock(x, b * kBlockRows, std::min(n, (b + 1) * kBlockRows), panels, assignment,
                  best_score);
    }
  };
  const int64_t work = n * panels.num_centroids() * panels.d();
  if (!parallel || num_blocks < 2 || work < kSerialWork) {
    run(0, num_blocks);
    return;
  }
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, num_blocks),
                    [&](const tbb::blocked_range<int64_t>& r) { run(r.begin(), r.end()); });
}

}  // namespace kvwave::index

namespace kvwave::index {

void ScorePanels(const float* x, int64_t n, const CentroidPanels& panels, const uint64_t* need,
                 PanelTop2* out, bool parallel) {
  const int64_t num_blocks = (n + kBlockRows - 1) / kBlockRows;
  auto run = [&](int64_t first_block, int64_t last_block) {
    for (int64_t b = first_block; b < last_block; ++b) {
      ScorePanelsBlock(x, b * kBlockRows, std::min(n, (b + 1) * kBlockRows), panels, need, out);
    }
  };
  const int64_t work = n * panels.num_centroids() * panels.d();
  if (!parallel || num_blocks < 2 || work < kSerialWork) {
    run(0, num_blocks);
    return;
  }
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, num_blocks),
                    [&](const tbb::blocked_range<int64_t>& r) { run(r.begin(), r.end()); });
}

}  // namespace kvwave::index
