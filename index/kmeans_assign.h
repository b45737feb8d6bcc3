// The assignment step of spherical k-means: for each of n vectors, the index of the centroid with
// the largest inner product. It is an [n x d] x [d x C] product fused with a row-wise argmax, done
// by a register-blocked AVX2/FMA micro-kernel (6 vectors x 16 centroids) over centroids packed
// into transposed panels, parallelised with oneTBB over blocks of vectors.
//
// CentroidPanels is a plain value: build it once per k-means iteration, then share it read-only
// between threads. AssignMaxInnerProduct is thread-safe (it writes only its outputs) and its
// result does not depend on the thread count or block split.
#ifndef KVWAVE_INDEX_KMEANS_ASSIGN_H_
#define KVWAVE_INDEX_KMEANS_ASSIGN_H_

#include <cstdint>
#include <vector>

namespace kvwave::index {

// Centroids transposed into panels of kWidth: panel p holds centroids [p*kWidth, (p+1)*kWidth)
// as [d][kWidth] floats. Lanes past the last centroid are zero and never win the argmax.
class CentroidPanels {
 public:
  static constexpr int kWidth = 16;

  // REQUIRES: centroids has num_centroids * d floats (row-major); num_centroids >= 1, d >= 1.
  void Pack(const float* centroids, int num_centroids, int d);

  int num_centroids() const { return num_centroids_; }
  int d() const { return d_; }
  int num_panels() const { return (num_centroids_ + kWidth - 1) / kWidth; }
  const float* panel(int p) const { return data_.data() + int64_t{p} * d_ * kWidth; }

 private:
  int num_centroids_ = 0;
  int d_ = 0;
  std::vector<float> data_;
};

// assignment[i] = argmax_c x_i . centroid_c (the lowest c among exact ties); if best_score is not
// null, best_score[i] = that maximum. A row whose scores are all NaN gets centroid 0.
// REQUIRES: x has n * panels.d() floats; assignment (and best_score) has n entries.
// `parallel` = false runs on the calling thread only.
void AssignMaxInnerProduct(const float* x, int64_t n, const CentroidPanels& panels,
                           int32_t* assignment, float* best_score, bool parallel = true);

}  // namespace kvwave::index

#endif  // KVWAVE_INDEX_KMEANS_ASSIGN_H_
