// Spherical k-means over unit vectors (the core of the wave index), in two interchangeable
// implementations: our own (AVX2/FMA assignment kernel + oneTBB, index/kmeans_assign.h) and FAISS
// (faiss::Clustering with spherical = true over an IndexFlatIP).
//
// Both start from the centroids passed in, run `iterations` rounds of (assign every vector to the
// centroid of largest inner product; replace each centroid by the normalised mean of its members)
// and end with one more assignment. Empty clusters: ours keeps the previous centroid; FAISS
// re-seeds it by splitting a large cluster (its own rule, deterministic for a fixed seed).
//
// Ours prunes the assignment passes between the first and the last with Hamerly-style bounds,
// one upper bound per panel of 16 centroids (see kmeans.cc): a vector is rescored only against
// the panels its bounds cannot rule out, and not at all when they prove its cluster unchanged.
// The bounds carry a margin for float rounding, so the pruned run makes exactly the choices of
// the unpruned one (same assignment, bit-identical centroids); the final pass is always full.
//
// Stateless functions; thread-safe. Deterministic for the same input.
#ifndef KVWAVE_INDEX_KMEANS_H_
#define KVWAVE_INDEX_KMEANS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace kvwave::index {

// Work done by one assignment pass of SphericalKMeansOwn (for benchmarks and tests).
// Work is counted in (vector, panel of 16 centroids) pairs; a full pass scores n * P of them.
struct KMeansPassStats {
  bool full = false;         // every vector scored against every centroid
  int64_t rescored = 0;      // vectors scored against at least one panel
  int64_t scored_pairs = 0;  // (vector, panel) pairs scored
  int64_t scored_own = 0;    // vectors whose own-centroid score was recomputed from bounds
};

// REQUIRES: unit has n * d floats (each row unit length or zero); centroids has C * d floats with
// 1 <= C <= n (the initial centroids, replaced by the final ones); iterations >= 0.
// On return assignment has n entries in [0, C). `prune` = false scores every vector against
// every centroid on every pass (the reference the pruned run must reproduce). If stats is not
// null it receives one entry per assignment pass.
[[nodiscard]] absl::Status SphericalKMeansOwn(const float* unit, int64_t n, int d, int iterations,
                                              std::vector<float>* centroids,
                                              std::vector<int32_t>* assignment, bool prune = true,
                                              std::vector<KMeansPassStats>* stats = nullptr);

// Same contract, computed by FAISS. FAISS exceptions come back as an Internal error.
[[nodiscard]] absl::Status SphericalKMeansFaiss(const float* unit, int64_t n, int d, int iterations,
                                                std::vector<float>* centroids,
                                                std::vector<int32_t>* assignment);

// Mean over the n vectors of (unit_i . centroid_{assignment_i}) / |centroid|: the spherical
// k-means objective (mean cosine to the own centroid; a zero centroid counts as cosine 0).
double MeanCosineToCentroid(const float* unit, int64_t n, int d, const float* centroids,
                            const int32_t* assignment);

}  // namespace kvwave::index

#endif  // KVWAVE_INDEX_KMEANS_H_
