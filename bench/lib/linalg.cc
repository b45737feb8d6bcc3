#include "bench/lib/linalg.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvwave::bench {

Moments ComputeMoments(const float* rows, int64_t n, int d) {
  Moments m;
  m.d = d;
  m.mean.assign(static_cast<size_t>(d), 0.0);
  m.cov.assign(static_cast<size_t>(d) * d, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < d; ++i) m.mean[i] += rows[t * d + i];
  }
  for (double& x : m.mean) x /= static_cast<double>(n);
  std::vector<double> c(static_cast<size_t>(d));
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < d; ++i) c[i] = rows[t * d + i] - m.mean[i];
    for (int i = 0; i < d; ++i) {
      for (int j = 0; j <= i; ++j) m.cov[i * d + j] += c[i] * c[j];
    }
  }
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j <= i; ++j) {
      m.cov[i * d + j] /= static_cast<double>(n);
      m.cov[j * d + i] = m.cov[i * d + j];
    }
  }
  return m;
}

GaussianFit::GaussianFit(const Moments& m, double ridge) : d_(m.d), mean_(m.mean) {
  const int d = d_;
  double trace = 0;
  for (int i = 0; i < d; ++i) trace += m.cov[i * d + i];
  chol_ = m.cov;
  for (int i = 0; i < d; ++i) chol_[i * d + i] += ridge * trace / d + 1e-12;
  for (int j = 0; j < d; ++j) {  // in-place Cholesky, lower triangle
    double s = chol_[j * d + j];
    for (int k = 0; k < j; ++k) s -= chol_[j * d + k] * chol_[j * d + k];
    const double diag = std::sqrt(std::max(s, 1e-300));
    chol_[j * d + j] = diag;
    for (int i = j + 1; i < d; ++i) {
      double v = chol_[i * d + j];
      for (int k = 0; k < j; ++k) v -= chol_[i * d + k] * chol_[j * d + k];
      chol_[i * d + j] = v / diag;
    }
    for (int i = 0; i < j; ++i) chol_[i * d + j] = 0.0;
  }
}

double GaussianFit::Mahalanobis(const float* x) const {
  const int d = d_;
  std::vector<double> y(static_cast<size_t>(d));
  double sum = 0;
  for (int i = 0; i < d; ++i) {  // solve L y = x - mean
    double v = x[i] - mean_[i];
    for (int k = 0; k < i; ++k) v -= chol_[i * d + k] * y[k];
    y[i] = v / chol_[i * d + i];
    sum += y[i] * y[i];
  }
  return std::sqrt(sum);
}

Eigen SymmetricEigen(std::vector<double> a, int d) {
  std::vector<double> v(static_cast<size_t>(d) * d, 0.0);
  for (int i = 0; i < d; ++i) v[i * d + i] = 1.0;
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0, total = 0;
    for (int i = 0; i < d; ++i) {
      for (int j = 0; j < d; ++j) (i == j ? total : off) += a[i * d + j] * a[i * d + j];
    }
    if (off <= 1e-22 * (total + off)) break;
    for (int p = 0; p < d - 1; ++p) {
      for (int q = p + 1; q < d; ++q) {
        const double apq = a[p * d + q];
        if (std::abs(apq) < 1e-300) continue;
        const double theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
        const double t =
            (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1.0 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < d; ++k) {  // A <- A J (columns p, q)
          const double akp = a[k * d + p], akq = a[k * d + q];
          a[k * d + p] = c * akp - s * akq;
          a[k * d + q] = s * akp + c * akq;
        }
        for (int k = 0; k < d; ++k) {  // A <- J^T A (rows p, q)
          const double apk = a[p * d + k], aqk = a[q * d + k];
          a[p * d + k] = c * apk - s * aqk;
          a[q * d + k] = s * apk + c * aqk;
        }
        for (int k = 0; k < d; ++k) {
          const double vkp = v[k * d + p], vkq = v[k * d + q];
          v[k * d + p] = c * vkp - s * vkq;
          v[k * d + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<int> order(static_cast<size_t>(d));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int x, int y) { return a[x * d + x] > a[y * d + y]; });
  Eigen e;
  e.vectors.resize(static_cast<size_t>(d) * d);
  for (int j = 0; j < d; ++j) {
    e.values.push_back(a[order[j] * d + order[j]]);
    for (int k = 0; k < d; ++k) e.vectors[k * d + j] = v[k * d + order[j]];
  }
  return e;
}

}  // namespace kvwave::bench
