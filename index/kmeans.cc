#include "index/kmeans.h"

#include <cmath>
#include <cstring>

#include "index/distance.h"
#include "index/kmeans_assign.h"

namespace kvwave::index {
namespace {

// Replaces each non-empty cluster's centroid by the normalised sum of its members. A cluster
// with no members (or whose members sum to zero) keeps its previous centroid.
void UpdateCentroids(const float* unit, int64_t n, int d, const std::vector<int32_t>& assignment,
                     std::vector<float>* centroids, std::vector<float>* sums,
                     std::vector<int32_t>* counts) {
  const int num_centroids = static_cast<int>(centroids->size() / d);
  sums->assign(centroids->size(), 0.0f);
  counts->assign(num_centroids, 0);
  for (int64_t i = 0; i < n; ++i) {
    float* sum = sums->data() + int64_t{assignment[i]} * d;
    const float* x = unit + i * d;
    for (int k = 0; k < d; ++k) sum[k] += x[k];
    ++(*counts)[assignment[i]];
  }
  for (int c = 0; c < num_centroids; ++c) {
    if ((*counts)[c] == 0) continue;
    const float* sum = sums->data() + int64_t{c} * d;
    const float norm = std::sqrt(Dot(sum, sum, d));
    if (!(norm > 0.0f)) continue;
    float* centroid = centroids->data() + int64_t{c} * d;
    const float inv = 1.0f / norm;
    for (int k = 0; k < d; ++k) centroid[k] = sum[k] * inv;
  }
}

}  // namespace

absl::Status SphericalKMeansOwn(const float* unit, int64_t n, int d, int iterations,
                                std::vector<float>* centroids, std::vector<int32_t>* assignment) {
  if (n < 1 || d < 1 || iterations < 0 || centroids->empty() || centroids->size() % d != 0) {
    return absl::InvalidArgumentError("SphericalKMeansOwn: bad shape or iteration count");
  }
  const int num_centroids = static_cast<int>(centroids->size() / d);
  assignment->resize(n);
  CentroidPanels panels;
  std::vector<float> sums;
  std::vector<int32_t> counts;
  std::vector<int32_t> previous;
  for (int it = 0; it <= iterations; ++it) {
    panels.Pack(centroids->data(), num_centroids, d);
    AssignMaxInnerProduct(unit, n, panels, assignment->data(), /*best_score=*/nullptr);
    if (it == iterations) break;  // the final assignment
    // Converged: the centroids were computed from `previous`, so recomputing them from an equal
    // assignment gives the same centroids, and every later round repeats this one exactly.
    if (it > 0 && previous == *assignment) break;
    UpdateCentroids(unit, n, d, *assignment, centroids, &sums, &counts);
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
