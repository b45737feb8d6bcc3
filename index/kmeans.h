// Spherical k-means over unit vectors (the core of the wave index), in two interchangeable
// implementations: our own (AVX2/FMA assignment kernel + oneTBB, index/kmeans_assign.h) and FAISS
// (faiss::Clustering with spherical = true over an IndexFlatIP).
//
// Both start from the centroids passed in, run `iterations` rounds of (assign every vector to the
// centroid of largest inner product; replace each centroid by the normalised mean of its members)
// and end with one more assignment. Empty clusters: ours keeps the previous centroid; FAISS
// re-seeds it by splitting a large cluster (its own rule, deterministic for a fixed seed).
//
// Stateless functions; thread-safe. Deterministic for the same input.
#ifndef KVWAVE_INDEX_KMEANS_H_
#define KVWAVE_INDEX_KMEANS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace kvwave::index {

// REQUIRES: unit has n * d floats (each row unit length or zero); centroids has C * d floats with
// 1 <= C <= n (the initial centroids, replaced by the final ones); iterations >= 0.
// On return assignment has n entries in [0, C).
[[nodiscard]] absl::Status SphericalKMeansOwn(const float* unit, int64_t n, int d, int iterations,
                                              std::vector<float>* centroids,
                                              std::vector<int32_t>* assignment);

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
