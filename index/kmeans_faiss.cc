// The FAISS implementation of index/kmeans.h, kept apart so FAISS headers stay in one file.
#include <exception>
#include <string>

#include "absl/strings/str_cat.h"
#include "faiss/Clustering.h"
#include "faiss/IndexFlat.h"
#include "index/kmeans.h"

namespace kvwave::index {
namespace {

// Runs FAISS spherical k-means from the given centroids and the final assignment. May throw.
void RunFaiss(const float* unit, int64_t n, int d, int iterations, std::vector<float>* centroids,
              std::vector<int32_t>* assignment) {
  const int num_centroids = static_cast<int>(centroids->size() / d);
  faiss::IndexFlatIP index(d);
  if (iterations > 0) {
    faiss::ClusteringParameters params;
    params.niter = iterations;
    params.nredo = 1;
    params.spherical = true;
    params.verbose = false;
    params.seed = 1234;
    params.min_points_per_centroid = 1;  // we want ~16 per cluster; silences FAISS's warning
    params.max_points_per_centroid = static_cast<int>(n / num_centroids) + 1;  // no subsampling
    faiss::Clustering clustering(d, num_centroids, params);
    clustering.centroids = *centroids;  // used as the initialisation
    clustering.train(n, unit, index);
    *centroids = clustering.centroids;
  }
  // FAISS leaves the final centroids in the index only after its iterations; rebuild it so the
  // final assignment is against exactly the centroids we return.
  index.reset();
  index.add(num_centroids, centroids->data());
  std::vector<float> scores(n);
  std::vector<faiss::Index::idx_t> labels(n);
  index.search(n, unit, 1, scores.data(), labels.data());
  assignment->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] < 0 || labels[i] >= num_centroids) {
      throw std::runtime_error(absl::StrCat("FAISS returned label ", labels[i], " for row ", i));
    }
    (*assignment)[i] = static_cast<int32_t>(labels[i]);
  }
}

}  // namespace

absl::Status SphericalKMeansFaiss(const float* unit, int64_t n, int d, int iterations,
                                  std::vector<float>* centroids, std::vector<int32_t>* assignment) {
  if (n < 1 || d < 1 || iterations < 0 || centroids->empty() || centroids->size() % d != 0) {
    return absl::InvalidArgumentError("SphericalKMeansFaiss: bad shape or iteration count");
  }
  try {
    RunFaiss(unit, n, d, iterations, centroids, assignment);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("FAISS k-means failed: ", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace kvwave::index
