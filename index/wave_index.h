// Wave index of one segment (RetroInfer): spherical k-means over post-RoPE keys.
//
// Recipe: mean-centre the keys (subtract the segment's mean key), L2-normalise, start from
// evenly spaced tokens as centroids, run `iterations` rounds of (assign each token to the centroid
// of highest cosine similarity; recompute each centroid as the normalised mean of its members);
// then a final assignment, after which each cluster's centroid is the plain (unnormalised) mean of
// its members' original keys, which is what attention estimation needs.
//
// Stateless functions; thread-safe. Uses TBB internally for the assignment step.
#ifndef KVWAVE_INDEX_WAVE_INDEX_H_
#define KVWAVE_INDEX_WAVE_INDEX_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace kvwave::index {

struct WaveIndexOptions {
  int tokens_per_cluster = 16;  // number of clusters = ceil(n / tokens_per_cluster)
  int iterations = 10;
  bool mean_center = true;
  enum class Kernel { kOwn, kFaiss } kernel = Kernel::kOwn;  // kOwn: SIMD + TBB; kFaiss: faiss
  // kOwn only: skip rescoring tokens whose k-means bounds prove their cluster unchanged. Same
  // result as prune = false (see index/kmeans.h), several times faster; false is the reference.
  bool prune = true;
};

struct WaveClusters {
  int32_t num_clusters = 0;
  std::vector<int32_t> assignment;  // [n], cluster of each token, in [0, num_clusters)
  std::vector<int32_t> sizes;       // [num_clusters], members per cluster (0 = empty)
  std::vector<float> centroids;     // [num_clusters x d], mean of member keys (0 if empty)
};

// Clusters n keys of dimension d (float32, row-major). Deterministic for the same input.
// REQUIRES: keys has n*d floats. Errors: n < 1, d < 1, options out of range.
[[nodiscard]] absl::StatusOr<WaveClusters> ClusterKeys(const float* keys, int64_t n, int d,
                                                       const WaveIndexOptions& options);

}  // namespace kvwave::index

#endif  // KVWAVE_INDEX_WAVE_INDEX_H_
