// The one budget formula of tripartite attention, shared by the CPU backend (engine/head_ops.cc)
// and the GPU wave buffer (buffer/wave_buffer.cc): how many of a unit's clusters go to the
// retrieval zone (attended exactly) and to the estimation zone (estimated from centroid and value
// sum).
//
// Both budgets are fractions of ALL the unit's clusters: retrieval = ceil(r * C), estimation =
// ceil(e * C), each capped so that the two together never exceed C (the estimation zone takes
// what is left when r + e reaches 1). So "1.8% + 23.2%" attends 25% of the clusters and "1.8% +
// the rest (98.2%)" covers every cluster. A tiny tolerance keeps products such as 0.25 * 1000
// (= 250.00000000000003 in floating point) from rounding up to one cluster more.
//
// Stateless; thread-safe.
#ifndef KVWAVE_GPU_BUDGET_H_
#define KVWAVE_GPU_BUDGET_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace kvwave::gpu {

struct ZoneSizes {
  int64_t retrieval = 0;   // clusters attended exactly
  int64_t estimation = 0;  // next clusters, estimated
};

// Clusters of `fraction` of `total` (ceil, at most total; 0 for a fraction <= 0).
inline int64_t BudgetedClusters(double fraction, int64_t total) {
  if (!(fraction > 0) || total <= 0) return 0;
  const double want = std::ceil(fraction * static_cast<double>(total) - 1e-9);
  return want >= static_cast<double>(total) ? total : static_cast<int64_t>(want);
}

// REQUIRES: total >= 0. Budgets outside [0, 1] are clamped.
inline ZoneSizes SizeZones(double retrieval, double estimation, int64_t total) {
  ZoneSizes z;
  z.retrieval = BudgetedClusters(retrieval, total);
  z.estimation = std::min(total - z.retrieval, BudgetedClusters(estimation, total));
  return z;
}

// Two-pass ranking (attend.rank = two_pass): the clusters whose member keys the second pass
// scores, ceil(overfetch * r) of the retrieval zone's r, at most total (0 when r is 0). A pass is
// needed only when this exceeds r; at r = total (a 100% budget) it is r and the ranking is moot.
inline int64_t TwoPassCandidates(int64_t retrieval, double overfetch, int64_t total) {
  if (retrieval <= 0 || total <= 0) return 0;
  const double want = std::ceil(std::max(1.0, overfetch) * static_cast<double>(retrieval) - 1e-9);
  return want >= static_cast<double>(total) ? total : static_cast<int64_t>(want);
}

}  // namespace kvwave::gpu

#endif  // KVWAVE_GPU_BUDGET_H_
