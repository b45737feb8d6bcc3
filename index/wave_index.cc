#include "index/wave_index.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "index/distance.h"
#include "index/kmeans.h"

namespace kvwave::index {
namespace {

constexpr int kMaxIterations = 1000;

absl::Status Validate(const float* keys, int64_t n, int d, const WaveIndexOptions& options) {
  if (n < 1) return absl::InvalidArgumentError(absl::StrCat("ClusterKeys: n = ", n, " < 1"));
  if (d < 1) return absl::InvalidArgumentError(absl::StrCat("ClusterKeys: d = ", d, " < 1"));
  if (keys == nullptr) return absl::InvalidArgumentError("ClusterKeys: keys is null");
  if (n > std::numeric_limits<int64_t>::max() / d) {
    return absl::InvalidArgumentError("ClusterKeys: n * d overflows");
  }
  if (options.tokens_per_cluster < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClusterKeys: tokens_per_cluster = ", options.tokens_per_cluster, " < 1"));
  }
  if (options.iterations < 0 || options.iterations > kMaxIterations) {
    return absl::InvalidArgumentError(absl::StrCat("ClusterKeys: iterations = ", options.iterations,
                                                   " not in [0, ", kMaxIterations, "]"));
  }
  if ((n + options.tokens_per_cluster - 1) / options.tokens_per_cluster >
      std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("ClusterKeys: too many clusters for int32 ids");
  }
  if (options.kernel != WaveIndexOptions::Kernel::kOwn &&
      options.kernel != WaveIndexOptions::Kernel::kFaiss) {
    return absl::InvalidArgumentError("ClusterKeys: unknown kernel");
  }
  for (int64_t i = 0; i < n * d; ++i) {
    if (!std::isfinite(keys[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("ClusterKeys: key ", i / d, " has a non-finite element at ", i % d));
    }
  }
  return absl::OkStatus();
}

// The keys minus their mean (if `center`), each row scaled to unit length (zero rows stay zero).
std::vector<float> CenterAndNormalize(const float* keys, int64_t n, int d, bool center) {
  std::vector<double> mean(d, 0.0);
  if (center) {
    for (int64_t i = 0; i < n; ++i) {
      for (int k = 0; k < d; ++k) mean[k] += keys[i * d + k];
    }
    for (int k = 0; k < d; ++k) mean[k] /= static_cast<double>(n);
  }
  std::vector<float> mean_f(mean.begin(), mean.end());
  std::vector<float> unit(static_cast<size_t>(n) * d);
  for (int64_t i = 0; i < n; ++i) {
    float* row = unit.data() + i * d;
    for (int k = 0; k < d; ++k) row[k] = keys[i * d + k] - mean_f[k];
    const float norm = std::sqrt(Dot(row, row, d));
    if (norm > 0.0f) {
      const float inv = 1.0f / norm;
      for (int k = 0; k < d; ++k) row[k] *= inv;
    }
  }
  return unit;
}

// Centroid c starts at token c * n / C: evenly spaced over the segment.
std::vector<float> EvenlySpacedCentroids(const std::vector<float>& unit, int64_t n, int d,
                                         int32_t num_clusters) {
  std::vector<float> centroids(static_cast<size_t>(num_clusters) * d);
  for (int32_t c = 0; c < num_clusters; ++c) {
    const int64_t token = int64_t{c} * n / num_clusters;
    std::copy_n(unit.data() + token * d, d, centroids.data() + int64_t{c} * d);
  }
  return centroids;
}

// Sizes from the assignment; centroids = float64 mean of the members' original keys.
void Summarize(const float* keys, int64_t n, int d, WaveClusters* out) {
  out->sizes.assign(out->num_clusters, 0);
  std::vector<double> sums(static_cast<size_t>(out->num_clusters) * d, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = out->assignment[i];
    ++out->sizes[c];
    double* sum = sums.data() + int64_t{c} * d;
    for (int k = 0; k < d; ++k) sum[k] += keys[i * d + k];
  }
  out->centroids.assign(sums.size(), 0.0f);
  for (int32_t c = 0; c < out->num_clusters; ++c) {
    if (out->sizes[c] == 0) continue;
    const double inv = 1.0 / out->sizes[c];
    for (int k = 0; k < d; ++k) {
      out->centroids[int64_t{c} * d + k] = static_cast<float>(sums[int64_t{c} * d + k] * inv);
    }
  }
}

}  // namespace

absl::StatusOr<WaveClusters> ClusterKeys(const float* keys, int64_t n, int d,
                                         const WaveIndexOptions& options) {
  KVWAVE_RETURN_IF_ERROR(Validate(keys, n, d, options));
  WaveClusters out;
  out.num_clusters =
      static_cast<int32_t>((n + options.tokens_per_cluster - 1) / options.tokens_per_cluster);
  const std::vector<float> unit = CenterAndNormalize(keys, n, d, options.mean_center);
  std::vector<float> centroids = EvenlySpacedCentroids(unit, n, d, out.num_clusters);
  if (options.kernel == WaveIndexOptions::Kernel::kFaiss) {
    KVWAVE_RETURN_IF_ERROR(
        SphericalKMeansFaiss(unit.data(), n, d, options.iterations, &centroids, &out.assignment));
  } else {
    KVWAVE_RETURN_IF_ERROR(SphericalKMeansOwn(unit.data(), n, d, options.iterations, &centroids,
                                              &out.assignment, options.prune));
  }
  Summarize(keys, n, d, &out);
  return out;
}

}  // namespace kvwave::index
