#include "index/kmeans.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "index/distance.h"
#include "index/kmeans_assign.h"

namespace kvwave::index {
namespace {

constexpr int kGroup = CentroidPanels::kWidth;  // centroids per bound group = per panel

// Bound pruning: Hamerly's algorithm, for maximum inner product, with one upper bound per panel
// of kGroup centroids (a Yinyang-style grouping that matches the assignment kernel's panels).
// Per vector x, assigned to cluster a:
//   lower       <= x . c_a
//   upper[p]    >= max over centroids j != a of panel p of x . c_j
// When centroid j moves by shift_j = |c_j' - c_j|, |x . c_j' - x . c_j| <= |x| shift_j, so
// lower -= |x| shift_a and upper[p] += |x| max_{j in p, j != a} shift_j keep the bounds valid.
// Panel p cannot hold a better centroid while lower - upper[p] > slack, even after rounding:
// each score the assignment kernel computes is within `gamma` of the exact one (the classic
// gamma_d bound on a d-term dot product), so slack = 4 * gamma covers both the bounds' own
// rounding and that of the full pass they stand in for. Shifts are inflated slightly so that
// the float updates of the bounds round the safe way. A vector whose bounds fail (after
// recomputing lower exactly) is rescored against its own panel and the panels that failed, and
// its cluster becomes the best of those: exactly the full pass's choice.
struct Bounds {
  int num_panels = 0;
  std::vector<float> lower;  // [n]
  std::vector<float> upper;  // [n x num_panels]
  std::vector<float> shift;  // [C], inflated |x|max * |c_j' - c_j| of the last update
  float slack = 0.0f;
  std::vector<uint64_t> need;     // [n x PanelMaskWords] scratch: pairs to score this pass
  std::vector<PanelTop2> scored;  // [n x num_panels] scratch: their scores
};

// An upper bound on max |x| over the rows (1 for unit rows, 0 only if every row is zero): the
// float dot product is inflated by its worst-case relative rounding error.
float MaxRowNorm(const float* rows, int64_t n, int d) {
  float max_sq = 0.0f;
  for (int64_t i = 0; i < n; ++i) max_sq = std::max(max_sq, Dot(rows + i * d, rows + i * d, d));
  const double gamma = d * std::ldexp(1.0, -24) / (1.0 - d * std::ldexp(1.0, -24));
  return static_cast<float>(std::sqrt(max_sq * (1.0 + 2.0 * gamma)) * (1.0 + 1e-6));
}

// 4 * (worst-case rounding error of a float dot product of length d, FMA or not, any order)
// for vectors of norm at most `norm_x` and `norm_c`, with a little headroom.
float RoundingSlack(int d, float norm_x, float norm_c) {
  const double unit_roundoff = std::ldexp(1.0, -24);
  const double gamma = d * unit_roundoff / (1.0 - d * unit_roundoff);
  return static_cast<float>(4.0 * 1.01 * gamma * norm_x * norm_c + 1e-30);
}

// Replaces the centroid of each cluster marked dirty (one whose membership changed) by the
// normalised sum of its members; a dirty cluster with no members (or a zero sum) keeps its
// centroid. Clean clusters have the members, hence the sum and centroid, of the last update and
// are skipped. If shift is not null, (*shift)[c] = |new - old| of each centroid.
void UpdateCentroids(const float* unit, int64_t n, int d, const std::vector<int32_t>& assignment,
                     const std::vector<char>& dirty, std::vector<float>* centroids,
                     std::vector<float>* sums, std::vector<float>* shift) {
  const int num_centroids = static_cast<int>(centroids->size() / d);
  sums->resize(centroids->size());
  std::vector<int32_t> counts(num_centroids, 0);
  for (int c = 0; c < num_centroids; ++c) {
    if (dirty[c]) std::fill_n(sums->data() + int64_t{c} * d, d, 0.0f);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!dirty[assignment[i]]) continue;
    float* sum = sums->data() + int64_t{assignment[i]} * d;
    const float* x = unit + i * d;
    for (int k = 0; k < d; ++k) sum[k] += x[k];
    ++counts[assignment[i]];
  }
  if (shift != nullptr) shift->assign(num_centroids, 0.0f);
  for (int c = 0; c < num_centroids; ++c) {
    if (counts[c] == 0) continue;
    const float* sum = sums->data() + int64_t{c} * d;
    const float norm = std::sqrt(Dot(sum, sum, d));
    if (!(norm > 0.0f)) continue;
    float* centroid = centroids->data() + int64_t{c} * d;
    const float inv = 1.0f / norm;
    double moved = 0.0;
    for (int k = 0; k < d; ++k) {
      const float updated = sum[k] * inv;
      moved += (double{updated} - centroid[k]) * (double{updated} - centroid[k]);
      centroid[k] = updated;
    }
    if (shift != nullptr) (*shift)[c] = static_cast<float>(std::sqrt(moved));
  }
}

// Marks the clusters that gained or lost a member between `previous` and `current` (all of
// them when there is no previous assignment).
void MarkDirty(const std::vector<int32_t>& previous, const std::vector<int32_t>& current,
               std::vector<char>* dirty) {
  if (previous.size() != current.size()) {
    std::fill(dirty->begin(), dirty->end(), 1);
    return;
  }
  std::fill(dirty->begin(), dirty->end(), 0);
  for (size_t i = 0; i < current.size(); ++i) {
    if (previous[i] != current[i]) (*dirty)[previous[i]] = (*dirty)[current[i]] = 1;
  }
}

// Scales raw centroid shifts into bound increments: times max |x|, inflated by a relative and
// an absolute margin so the float arithmetic on the bounds never makes them too tight.
// `scale` is max |x| * max |c|, the largest magnitude a bound can have.
void InflateShifts(float max_row_norm, float scale, std::vector<float>* shift) {
  for (float& s : *shift) {
    if (s > 0.0f) s = s * max_row_norm * (1.0f + 1e-4f) + 1e-6f * scale;
  }
}

// Per panel, the two largest shifts of its centroids and the centroid of the largest: the
// increment of upper[p] for a vector of cluster a is first[p] unless a is first_centroid[p].
struct PanelShifts {
  std::vector<float> first, second;
  std::vector<int32_t> first_centroid;
};

PanelShifts LargestShifts(const std::vector<float>& shift, int num_panels) {
  PanelShifts out;
  out.first.assign(num_panels, 0.0f);
  out.second.assign(num_panels, 0.0f);
  out.first_centroid.assign(num_panels, -1);
  for (int32_t c = 0; c < static_cast<int32_t>(shift.size()); ++c) {
    const int p = c / kGroup;
    if (shift[c] > out.first[p]) {
      out.second[p] = out.first[p];
      out.first[p] = shift[c];
      out.first_centroid[p] = c;
    } else {
      out.second[p] = std::max(out.second[p], shift[c]);
    }
  }
  return out;
}

// upper[p] += add[p] for p < count; returns the largest new upper[p] (-inf if count = 0).
float AddAndMax(const float* add, int count, float* upper) {
  __m256 max8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int p = 0;
  for (; p + 8 <= count; p += 8) {
    const __m256 u = _mm256_add_ps(_mm256_loadu_ps(upper + p), _mm256_loadu_ps(add + p));
    _mm256_storeu_ps(upper + p, u);
    max8 = _mm256_max_ps(max8, u);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, max8);
  float result = *std::max_element(lanes, lanes + 8);
  for (; p < count; ++p) result = std::max(result, upper[p] += add[p]);
  return result;
}

// Sets bit p of need[] for each panel p whose bound does not clear lower by more than slack.
void MarkFailingPanels(const float* upper, int count, float lower, float slack, uint64_t* need) {
  const __m256 lower8 = _mm256_set1_ps(lower), slack8 = _mm256_set1_ps(slack);
  int p = 0;
  for (; p + 8 <= count; p += 8) {
    const __m256 gap = _mm256_sub_ps(lower8, _mm256_loadu_ps(upper + p));
    const uint64_t bits = static_cast<uint32_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(gap, slack8, _CMP_NGT_UQ)));  // !(gap > slack)
    need[p / 64] |= bits << (p % 64);
  }
  for (; p < count; ++p) {
    if (!(lower - upper[p] > slack)) need[p / 64] |= uint64_t{1} << (p % 64);
  }
}

// Moves vector i's bounds by the last centroid update and sets its need bits to the panels it
// must be rescored against (none if its bounds still prove its cluster). Returns true if any.
bool CheckVector(const float* x, int d, const float* centroids, int32_t a, const PanelShifts& moved,
                 float shift_a, float slack, float* lower, float* upper, uint64_t* need,
                 int64_t* scored_own) {
  const int num_panels = static_cast<int>(moved.first.size());
  const int own = a / kGroup;
  const float own_upper =
      upper[own] + (a == moved.first_centroid[own] ? moved.second[own] : moved.first[own]);
  float max_upper = AddAndMax(moved.first.data(), num_panels, upper);
  upper[own] = own_upper;  // the own panel's bound excludes a, so a's shift may not count
  max_upper = std::max(max_upper, own_upper);  // (only ever looser than the true maximum)
  std::fill_n(need, PanelMaskWords(num_panels), 0);
  *lower -= shift_a;
  if (*lower - max_upper > slack) return false;
  *lower = Dot(x, centroids + int64_t{a} * d, d);
  ++*scored_own;
  if (*lower - max_upper > slack) return false;
  MarkFailingPanels(upper, num_panels, *lower, slack, need);
  need[own / 64] |= uint64_t{1} << (own % 64);
  return true;
}

// Calls f(p) for each panel p whose bit is set, in increasing order.
template <typename F>
void ForEachPanel(const uint64_t* need, int words, F f) {
  for (int w = 0; w < words; ++w) {
    for (uint64_t bits = need[w]; bits != 0; bits &= bits - 1) f(w * 64 + __builtin_ctzll(bits));
  }
}

// Vector i's new cluster and bounds from its rescored panels: the highest best score wins (the
// lowest centroid on ties, as panels are visited in order); scored panels get exact bounds.
// Returns the number of panels scored.
int ApplyScores(int num_panels, const uint64_t* need, const PanelTop2* scored, int32_t* a,
                float* lower, float* upper) {
  const int words = PanelMaskWords(num_panels);
  const PanelTop2* winner = nullptr;
  int count = 0;
  ForEachPanel(need, words, [&](int p) {
    ++count;
    upper[p] = scored[p].best;
    if (winner == nullptr || scored[p].best > winner->best) winner = &scored[p];
  });
  *a = winner->index;
  *lower = winner->best;
  upper[*a / kGroup] = scored[*a / kGroup].second;
  return count;
}

// One assignment pass that keeps the bounds: every (vector, panel) pair on the first pass,
// only those whose bounds fail afterwards.
void BoundedAssign(const float* unit, int64_t n, int d, const float* centroids,
                   const CentroidPanels& panels, bool first, std::vector<int32_t>* assignment,
                   Bounds* b, KMeansPassStats* pass) {
  const int num_panels = b->num_panels;
  const int words = PanelMaskWords(num_panels);
  b->need.resize(static_cast<size_t>(n) * words);
  b->scored.resize(static_cast<size_t>(n) * num_panels);
  std::vector<int64_t> rescore;
  if (first) {
    std::fill(b->need.begin(), b->need.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      for (int p = 0; p < num_panels; ++p) b->need[i * words + p / 64] |= uint64_t{1} << (p % 64);
      rescore.push_back(i);
    }
  } else {
    const PanelShifts moved = LargestShifts(b->shift, num_panels);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t a = (*assignment)[i];
      if (CheckVector(unit + i * d, d, centroids, a, moved, b->shift[a], b->slack, &b->lower[i],
                      &b->upper[i * num_panels], &b->need[i * words], &pass->scored_own)) {
        rescore.push_back(i);
      }
    }
  }
  ScorePanels(unit, n, panels, b->need.data(), b->scored.data());
  for (const int64_t i : rescore) {
    pass->scored_pairs += ApplyScores(num_panels, &b->need[i * words], &b->scored[i * num_panels],
                                      &(*assignment)[i], &b->lower[i], &b->upper[i * num_panels]);
  }
  pass->rescored = static_cast<int64_t>(rescore.size());
  pass->full = first;
}

// The largest centroid norm, at least 1 (updated centroids are unit length).
float MaxCentroidNorm(const std::vector<float>& centroids, int d) {
  return std::max(1.0f,
                  MaxRowNorm(centroids.data(), static_cast<int64_t>(centroids.size()) / d, d));
}

}  // namespace

absl::Status SphericalKMeansOwn(const float* unit, int64_t n, int d, int iterations,
                                std::vector<float>* centroids, std::vector<int32_t>* assignment,
                                bool prune, std::vector<KMeansPassStats>* stats) {
  if (n < 1 || d < 1 || iterations < 0 || centroids->empty() || centroids->size() % d != 0) {
    return absl::InvalidArgumentError("SphericalKMeansOwn: bad shape or iteration count");
  }
  const int num_centroids = static_cast<int>(centroids->size() / d);
  assignment->resize(n);
  if (stats != nullptr) stats->clear();
  const float norm_x = MaxRowNorm(unit, n, d);
  const float norm_c = MaxCentroidNorm(*centroids, d) * (1.0f + 1e-5f);
  CentroidPanels panels;
  Bounds bounds;
  bounds.num_panels = (num_centroids + kGroup - 1) / kGroup;
  bounds.slack = RoundingSlack(d, norm_x, norm_c);
  bounds.lower.resize(prune ? n : 0);
  bounds.upper.resize(prune ? n * bounds.num_panels : 0);
  std::vector<float> sums;
  std::vector<int32_t> previous;
  std::vector<char> dirty(num_centroids);
  for (int it = 0; it <= iterations; ++it) {
    panels.Pack(centroids->data(), num_centroids, d);
    KMeansPassStats pass;
    // Pass 0 is a plain full pass; pass 1 scores every pair too, to set exact bounds (setting
    // them on pass 0 leaves them loose by the large first move of the centroids away from the
    // seed tokens); later passes are pruned, but the final pass is always a full one.
    pass.full = !prune || it == 0 || it == iterations;
    if (pass.full) {
      AssignMaxInnerProduct(unit, n, panels, assignment->data(), /*best_score=*/nullptr);
      pass.rescored = n;
      pass.scored_pairs = n * bounds.num_panels;
    } else {
      BoundedAssign(unit, n, d, centroids->data(), panels, it == 1, assignment, &bounds, &pass);
    }
    if (stats != nullptr) stats->push_back(pass);
    if (it == iterations) break;  // the final assignment
    // Converged: the centroids were computed from `previous`, so recomputing them from an equal
    // assignment gives the same centroids, and every later round repeats this one exactly.
    if (it > 0 && previous == *assignment) {
      if (pass.full) break;
      iterations = it + 1;  // same centroids; the next pass is the full final one
      continue;
    }
    MarkDirty(previous, *assignment, &dirty);
    UpdateCentroids(unit, n, d, *assignment, dirty, centroids, &sums,
                    prune ? &bounds.shift : nullptr);
    if (prune) InflateShifts(norm_x, norm_x * norm_c, &bounds.shift);
    previous = *assignment;
  }
  return absl::OkStatus();
}

double MeanCosineToCentroid(const float* unit, int64_t n, int d, const float* centroids,
                            const int32_t* assignment) {
  if (n < 1) return 0.0;
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float* c = centroids + int64_t{assignment[i]} * d;
    const double norm = std::sqrt(static_cast<double>(Dot(c, c, d)));
    if (norm > 0.0) total += Dot(unit + i * d, c, d) / norm;
  }
  return total / static_cast<double>(n);
}

}  // namespace kvwave::index
