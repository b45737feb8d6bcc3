// Small dense linear algebra in float64 for the bench: mean and covariance of a set of vectors,
// a Gaussian fitted to them (Cholesky factor) with Mahalanobis distances, and a symmetric
// eigendecomposition (cyclic Jacobi) for the low-rank models of `kvwave-bench synth`.
// Sizes are head dimensions (64..256), so O(d^3) is fine.
//
// Thread-safety: plain values and free functions.
#ifndef KVWAVE_BENCH_LIB_LINALG_H_
#define KVWAVE_BENCH_LIB_LINALG_H_

#include <cstdint>
#include <vector>

namespace kvwave::bench {

// Mean and covariance (population, d x d row-major) of n rows of d floats.
struct Moments {
  int d = 0;
  std::vector<double> mean;  // [d]
  std::vector<double> cov;   // [d x d]
};
Moments ComputeMoments(const float* rows, int64_t n, int d);

// A Gaussian N(mean, cov + ridge * (trace(cov)/d) * I); the ridge keeps it invertible.
class GaussianFit {
 public:
  GaussianFit(const Moments& m, double ridge);
  // sqrt((x - mean)^T Sigma^-1 (x - mean)).
  double Mahalanobis(const float* x) const;

 private:
  int d_;
  std::vector<double> mean_;
  std::vector<double> chol_;  // lower-triangular L, Sigma = L L^T
};

// Eigenvalues (descending) and eigenvectors (column j of `vectors`, d x d row-major) of a
// symmetric matrix.
struct Eigen {
  std::vector<double> values;
  std::vector<double> vectors;
};
Eigen SymmetricEigen(std::vector<double> a, int d);

}  // namespace kvwave::bench

#endif  // KVWAVE_BENCH_LIB_LINALG_H_
