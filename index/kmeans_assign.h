// The assignment step of spherical k-means: for each of n vectors, the index of the centroid with
// the largest inner product. It is an [n x d] x [d x C] product fused with a row-wise argmax, done
// by a register-blocked AVX2/FMA micro-kernel (6 vectors x 16 centroids) over centroids packed
// into transposed panels, parallelised with oneTBB over blocks of vectors.
//
// ScorePanels is the same kernel applied to a chosen subset of (vector, panel) pairs, giving
// per-panel top-two scores: the bound-pruned k-means uses it to rescore only what may change.
//
// CentroidPanels is a plain value: build it once per k-means iteration, then share it read-only
// between threads. AssignMaxInnerProduct is thread-safe (it writes only its outputs) and its
// result does not depend on the thread count or block split. So does ScorePanels.
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

// One vector scored against the (up to) kWidth centroids of one panel.
struct PanelTop2 {
  float best = 0.0f;    // the largest score
  int32_t index = 0;    // its centroid (the lowest among exact ties)
  float second = 0.0f;  // the largest score of the panel's other centroids (-inf if none)
};

// assignment[i] = argmax_c x_i . centroid_c (the lowest c among exact ties); if best_score is not
// null, best_score[i] = that maximum. A row whose scores are all NaN gets centroid 0.
// REQUIRES: x has n * panels.d() floats; assignment (and best_score) has n entries.
// `parallel` = false runs on the calling thread only.
void AssignMaxInnerProduct(const float* x, int64_t n, const CentroidPanels& panels,
                           int32_t* assignment, float* best_score, bool parallel = true);

// 64-bit words per vector in ScorePanels' `need` bit mask.
inline int PanelMaskWords(int num_panels) { return (num_panels + 63) / 64; }

// For each vector i and panel p whose bit is set in need (bit p % 64 of word
// need[i * PanelMaskWords(P) + p / 64], P = panels.num_panels()): out[i * P + p] = the top two of
// x_i against panel p; other entries are left alone. Scores are bit-identical to those
// AssignMaxInnerProduct compares, so a caller that scores every panel that could hold the winner
// and takes the highest best (lowest index on ties) gets exactly AssignMaxInnerProduct's answer.
// Same threading and determinism as AssignMaxInnerProduct.
// REQUIRES: x has n * panels.d() finite floats, the centroids are finite; need has
// n * PanelMaskWords(P) words; out has n * P entries.
void ScorePanels(const float* x, int64_t n, const CentroidPanels& panels, const uint64_t* need,
                 PanelTop2* out, bool parallel = true);

}  // namespace kvwave::index

#endif  // KVWAVE_INDEX_KMEANS_ASSIGN_H_
