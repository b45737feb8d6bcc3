#include "bench/lib/synth_model.h"

#include <cmath>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "bench/lib/linalg.h"
#include "config/dtype.h"
#include "config/status_macros.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvwave::bench {
namespace {

// Solves A X = B for X (A n x n, B n x m, row-major) by Gaussian elimination with pivoting.
std::vector<double> Solve(std::vector<double> a, std::vector<double> b, int n, int m) {
  for (int c = 0; c < n; ++c) {
    int pivot = c;
    for (int r = c + 1; r < n; ++r) {
      if (std::abs(a[r * n + c]) > std::abs(a[pivot * n + c])) pivot = r;
    }
    for (int j = 0; j < n; ++j) std::swap(a[c * n + j], a[pivot * n + j]);
    for (int j = 0; j < m; ++j) std::swap(b[c * m + j], b[pivot * m + j]);
    const double diag = a[c * n + c] != 0 ? a[c * n + c] : 1e-12;
    for (int r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = a[r * n + c] / diag;
      for (int j = 0; j < n; ++j) a[r * n + j] -= f * a[c * n + j];
      for (int j = 0; j < m; ++j) b[r * m + j] -= f * b[c * m + j];
    }
  }
  for (int r = 0; r < n; ++r) {
    for (int j = 0; j < m; ++j) b[r * m + j] /= a[r * n + r];
  }
  return b;
}

// Fits mean + rank-r PCA + diagonal residual to n rows; returns the normalised latents [n x r].
std::vector<double> FitPart(const std::vector<float>& rows, int64_t n, int d, int rank,
                            GaussianPart* part) {
  const Moments m = ComputeMoments(rows.data(), n, d);
  const Eigen e = SymmetricEigen(m.cov, d);
  part->mean.assign(m.mean.begin(), m.mean.end());
  part->basis.assign(static_cast<size_t>(d) * rank, 0.0f);
  part->sigma.assign(static_cast<size_t>(rank), 0.0f);
  part->residual.assign(static_cast<size_t>(d), 0.0f);
  for (int j = 0; j < rank; ++j) {
    part->sigma[j] = static_cast<float>(std::sqrt(std::max(e.values[j], 1e-12)));
    for (int i = 0; i < d; ++i)
      part->basis[i * rank + j] = static_cast<float>(e.vectors[i * d + j]);
  }
  for (int i = 0; i < d; ++i) {
    double var = m.cov[i * d + i];
    for (int j = 0; j < rank; ++j) var -= e.values[j] * e.vectors[i * d + j] * e.vectors[i * d + j];
    part->residual[i] = static_cast<float>(std::sqrt(std::max(var, 1e-6 * m.cov[i * d + i])));
  }
  std::vector<double> z(static_cast<size_t>(n) * rank, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < rank; ++j) {
      double s = 0;
      for (int i = 0; i < d; ++i) s += (rows[t * d + i] - m.mean[i]) * e.vectors[i * d + j];
      z[t * rank + j] = s / part->sigma[j];
    }
  }
  return z;
}

// Pre-RoPE vectors of positions [1, tokens) of one head of one layer.
std::vector<float> Unrotated(const trace::NpyArray& a, int64_t offset_of_t0, int64_t stride,
                             int64_t tokens, int d, double base) {
  std::vector<float> rows(static_cast<size_t>((tokens - 1) * d));
  for (int64_t t = 1; t < tokens; ++t) {
    float* x = rows.data() + (t - 1) * d;
    a.CopyFloats(offset_of_t0 + t * stride, d, x);
    ApplyRope(x, d, t, base, -1);
  }
  return rows;
}

// Coupling B (z_q = B z_k + noise) by least squares, and the std of the noise.
void FitCoupling(const std::vector<double>& zk, const std::vector<double>& zq, int64_t n, int r,
                 std::vector<float>* coupling, std::vector<float>* noise) {
  std::vector<double> ata(static_cast<size_t>(r) * r, 0.0), atb(static_cast<size_t>(r) * r, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < r; ++i) {
      for (int j = 0; j < r; ++j) {
        ata[i * r + j] += zk[t * r + i] * zk[t * r + j];
        atb[i * r + j] += zk[t * r + i] * zq[t * r + j];
      }
    }
  }
  for (int i = 0; i < r; ++i) ata[i * r + i] += 1e-6 * n;
  const std::vector<double> bt = Solve(ata, atb, r, r);  // [r_k x r_q] = B^T
  coupling->assign(static_cast<size_t>(r) * r, 0.0f);
  for (int i = 0; i < r; ++i) {
    for (int j = 0; j < r; ++j) (*coupling)[j * r + i] = static_cast<float>(bt[i * r + j]);
  }
  noise->assign(static_cast<size_t>(r), 0.0f);
  for (int j = 0; j < r; ++j) {
    double var = 0;
    for (int64_t t = 0; t < n; ++t) {
      double pred = 0;
      for (int i = 0; i < r; ++i) pred += bt[i * r + j] * zk[t * r + i];
      var += (zq[t * r + j] - pred) * (zq[t * r + j] - pred);
    }
    (*noise)[j] = static_cast<float>(std::sqrt(var / n));
  }
}

double Lag1Correlation(const std::vector<double>& z, int64_t n, int r) {
  double num = 0, den = 0;
  for (int64_t t = 1; t < n; ++t) {
    for (int j = 0; j < r; ++j) {
      num += z[t * r + j] * z[(t - 1) * r + j];
      den += z[t * r + j] * z[t * r + j];
    }
  }
  return den > 0 ? std::clamp(num / den, 0.0, 0.999) : 0.0;
}

}  // namespace

void ApplyRope(float* x, int d, int64_t position, double base, int sign) {
  const int half = d / 2;
  for (int i = 0; i < half; ++i) {
    const double angle = sign * static_cast<double>(position) * std::pow(base, -2.0 * i / d);
    const double c = std::cos(angle), s = std::sin(angle);
    const double x1 = x[i], x2 = x[i + half];
    x[i] = static_cast<float>(x1 * c - x2 * s);
    x[i + half] = static_cast<float>(x2 * c + x1 * s);
  }
}

absl::StatusOr<SynthModel> FitModel(const trace::Trace& trace, const SynthShape& shape,
                                    int64_t max_tokens) {
  SynthModel model;
  model.shape = shape;
  model.shape.q_heads = trace.q_heads;
  model.shape.kv_heads = trace.kv_heads;
  model.shape.head_dim = trace.head_dim;
  const int d = static_cast<int>(trace.head_dim), r = shape.rank;
  if (r < 1 || r > d) return absl::InvalidArgumentError("synth: rank must be in [1, head_dim]");
  const int64_t tokens = std::min(trace.tokens, max_tokens);
  if (tokens < 4 * d) return absl::InvalidArgumentError("synth: calibration trace too short");
  const int64_t group = trace.q_heads / trace.kv_heads;
  for (int64_t l = 0; l < shape.layers; ++l) {
    const int64_t tl = l % trace.layers;
    for (int64_t g = 0; g < trace.kv_heads; ++g) {
      KvHeadModel head;
      const int64_t kv_stride = trace.kv_heads * d;
      const std::vector<float> keys =
          Unrotated(trace.k, trace.KvIndex(tl, 0, g), kv_stride, tokens, d, shape.rope_base);
      const std::vector<double> zk = FitPart(keys, tokens - 1, d, r, &head.key);
      head.rho = static_cast<float>(Lag1Correlation(zk, tokens - 1, r));
      head.sink.resize(static_cast<size_t>(d));
      trace.k.CopyFloats(trace.KvIndex(tl, 0, g), d, head.sink.data());
      const Moments vm = [&] {
        std::vector<float> v(static_cast<size_t>(tokens * d));
        for (int64_t t = 0; t < tokens; ++t)
          trace.v.CopyFloats(trace.KvIndex(tl, t, g), d, &v[t * d]);
        return ComputeMoments(v.data(), tokens, d);
      }();
      for (int i = 0; i < d; ++i) {
        head.value_mean.push_back(static_cast<float>(vm.mean[i]));
        head.value_std.push_back(static_cast<float>(std::sqrt(vm.cov[i * d + i])));
      }
      for (int64_t j = 0; j < group; ++j) {
        const int64_t h = g * group + j;
        const std::vector<float> qs = Unrotated(trace.q, trace.QIndex(tl, 0, h), trace.q_heads * d,
                                                tokens, d, shape.rope_base);
        GaussianPart part;
        const std::vector<double> zq = FitPart(qs, tokens - 1, d, r, &part);
        head.query.push_back(std::move(part));
        head.coupling.emplace_back();
        head.noise.emplace_back();
        FitCoupling(zk, zq, tokens - 1, r, &head.coupling.back(), &head.noise.back());
      }
      model.heads.push_back(std::move(head));
    }
  }
  return model;
}

SynthModel DefaultModel(const SynthShape& shape, uint64_t seed) {
  SynthModel model;
  model.shape = shape;
  const int d = static_cast<int>(shape.head_dim), r = shape.rank;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  auto random_part = [&](float mean_scale, float sigma0) {
    GaussianPart p;
    for (int i = 0; i < d; ++i) p.mean.push_back(mean_scale * normal(rng));
    // Random orthonormal columns by Gram-Schmidt.
    p.basis.assign(static_cast<size_t>(d) * r, 0.0f);
    for (int j = 0; j < r; ++j) {
      std::vector<double> v(static_cast<size_t>(d));
      for (double& x : v) x = normal(rng);
      for (int c = 0; c < j; ++c) {
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += v[i] * p.basis[i * r + c];
        for (int i = 0; i < d; ++i) v[i] -= dot * p.basis[i * r + c];
      }
      double norm = 0;
      for (double x : v) norm += x * x;
      for (int i = 0; i < d; ++i) p.basis[i * r + j] = static_cast<float>(v[i] / std::sqrt(norm));
      p.sigma.push_back(sigma0 / std::sqrt(1.0f + j));
    }
    p.residual.assign(static_cast<size_t>(d), 0.3f);
    return p;
  };
  const int64_t group = shape.q_heads / shape.kv_heads;
  for (int64_t i = 0; i < shape.layers * shape.kv_heads; ++i) {
    KvHeadModel head;
    head.key = random_part(0.5f, 3.0f);
    head.sink = head.key.mean;
    for (float& x : head.sink) x *= 4.0f;
    head.rho = 0.9f;
    head.value_mean.assign(static_cast<size_t>(d), 0.0f);
    head.value_std.assign(static_cast<size_t>(d), 1.0f);
    for (int64_t j = 0; j < group; ++j) {
      head.query.push_back(random_part(1.0f, 2.0f));
      head.coupling.emplace_back(static_cast<size_t>(r) * r, 0.0f);
      for (int c = 0; c < r; ++c) head.coupling.back()[c * r + c] = 0.5f;
      head.noise.emplace_back(static_cast<size_t>(r), 0.85f);
    }
    model.heads.push_back(std::move(head));
  }
  return model;
}

namespace {

// x = mean_scale * mean + basis (sigma * z) + residual * eta.
void Sample(const GaussianPart& p, const float* z, float mean_scale, int d, int r,
            std::mt19937_64& rng, float* x) {
  std::normal_distribution<float> normal;
  for (int i = 0; i < d; ++i) {
    float v = mean_scale * p.mean[i] + p.residual[i] * normal(rng);
    for (int j = 0; j < r; ++j) v += p.basis[i * r + j] * p.sigma[j] * z[j];
    x[i] = v;
  }
}

// The --ood-lowvar pass over one (layer, KV head), after its keys and queries are written: U =
// the principal directions of the generated (post-RoPE, all positions) keys outside their top
// kLowVarSkip, the directions in which keys vary least and which a k-means of the keys, following
// the large directions, does not resolve. Each query of query head j gets
// ood_lowvar * ood * |pre-RoPE query mean| * U (w_j + s xi) / sqrt(1 + s^2) added, with w_j a fixed
// random unit vector per query head (the head's own bias), xi ~ N(0, I / dim U) per token and
// s = ood_lowvar_spread (how much the direction varies from token to token), so that
// its top keys are those whose small variations in U align with it, wherever they sit in
// position and in the k-means lists.
constexpr int kLowVarSkip = 16;

void AddLowVarianceQueryPart(const SynthModel& model, const KvHeadModel& head, int64_t layer,
                             int64_t g, int64_t tokens, double ood, double ood_lowvar,
                             double ood_lowvar_spread, uint64_t seed, uint16_t* q,
                             const uint16_t* k) {
  const SynthShape& s = model.shape;
  const int d = static_cast<int>(s.head_dim);
  const int p = d - std::min(kLowVarSkip, d - 1);
  const int64_t group = s.q_heads / s.kv_heads;
  std::vector<float> keys(static_cast<size_t>(tokens) * d);
  for (int64_t t = 0; t < tokens; ++t) {
    ToFloat(k + ((layer * tokens + t) * s.kv_heads + g) * d, DType::kF16, keys.data() + t * d, d);
  }
  const Eigen e = SymmetricEigen(ComputeMoments(keys.data(), tokens, d).cov, d);  // descending
  std::vector<float> basis(static_cast<size_t>(d) * p);  // [d x p], the p least-variance ones
  for (int i = 0; i < d; ++i) {
    for (int c = 0; c < p; ++c)
      basis[i * p + c] = static_cast<float>(e.vectors[i * d + (d - 1 - c)]);
  }
  std::mt19937_64 rng(seed ^ (0x51ed27ULL * (layer * s.kv_heads + g + 1)));
  std::normal_distribution<float> normal;
  for (int64_t j = 0; j < group; ++j) {
    double mean_norm = 0;
    for (float x : head.query[j].mean) mean_norm += double{x} * x;
    const float scale = static_cast<float>(ood_lowvar * ood * std::sqrt(mean_norm) /
                                           std::sqrt(1.0 + ood_lowvar_spread * ood_lowvar_spread));
    std::vector<float> w(static_cast<size_t>(p));
    double w2 = 0;
    for (float& x : w) {
      x = normal(rng);
      w2 += double{x} * x;
    }
    for (float& x : w) x = static_cast<float>(x / std::sqrt(w2));
    const int64_t h = g * group + j;
    std::vector<float> x(static_cast<size_t>(d)), c(static_cast<size_t>(p));
    for (int64_t t = 0; t < tokens; ++t) {
      uint16_t* row = q + ((layer * tokens + t) * s.q_heads + h) * d;
      ToFloat(row, DType::kF16, x.data(), d);
      for (int a = 0; a < p; ++a) {
        c[a] = w[a] + static_cast<float>(ood_lowvar_spread) * normal(rng) /
                          std::sqrt(static_cast<float>(p));
      }
      for (int i = 0; i < d; ++i) {
        float add = 0;
        for (int a = 0; a < p; ++a) add += basis[i * p + a] * c[a];
        x[i] += scale * add;
      }
      FromFloat(x.data(), DType::kF16, row, d);
    }
  }
}

// One (layer, KV head) of the trace: keys, values and the group's queries, as float16.
void GenerateHead(const SynthModel& model, const KvHeadModel& head, int64_t layer, int64_t g,
                  int64_t tokens, double ood, double ood_lowvar, double ood_lowvar_spread,
                  uint64_t seed, uint16_t* q, uint16_t* k, uint16_t* v) {
  const SynthShape& s = model.shape;
  const int d = static_cast<int>(s.head_dim), r = s.rank;
  const int64_t group = s.q_heads / s.kv_heads;
  std::vector<float> zk(static_cast<size_t>(tokens) * r);
  std::mt19937_64 rng(seed ^ (0x9e3779b97f4a7c15ULL * (layer * s.kv_heads + g + 1)));
  std::normal_distribution<float> normal;
  const float innov = std::sqrt(1.0f - head.rho * head.rho);
  for (int j = 0; j < r; ++j) zk[j] = normal(rng);
  for (int64_t t = 1; t < tokens; ++t) {
    for (int j = 0; j < r; ++j)
      zk[t * r + j] = head.rho * zk[(t - 1) * r + j] + innov * normal(rng);
  }
  constexpr int64_t kChunk = 4096;
  tbb::parallel_for(int64_t{0}, (tokens + kChunk - 1) / kChunk, [&](int64_t chunk) {
    std::mt19937_64 crng(seed * 31 + chunk * 1000003 + (layer * s.kv_heads + g) * 7919);
    std::normal_distribution<float> cnormal;
    std::vector<float> x(static_cast<size_t>(d)), zq(static_cast<size_t>(r));
    for (int64_t t = chunk * kChunk; t < std::min(tokens, (chunk + 1) * kChunk); ++t) {
      const float* z = zk.data() + t * r;
      if (t == 0) {
        x = head.sink;
      } else {
        Sample(head.key, z, 1.0f, d, r, crng, x.data());
      }
      ApplyRope(x.data(), d, t, s.rope_base, +1);
      FromFloat(x.data(), DType::kF16, k + ((layer * tokens + t) * s.kv_heads + g) * d, d);
      for (int i = 0; i < d; ++i) x[i] = head.value_mean[i] + head.value_std[i] * cnormal(crng);
      FromFloat(x.data(), DType::kF16, v + ((layer * tokens + t) * s.kv_heads + g) * d, d);
      for (int64_t j = 0; j < group; ++j) {
        for (int a = 0; a < r; ++a) {
          float sum = head.noise[j][a] * cnormal(crng);
          for (int b = 0; b < r; ++b) sum += head.coupling[j][a * r + b] * z[b];
          zq[a] = sum;
        }
        Sample(head.query[j], zq.data(), static_cast<float>(ood), d, r, crng, x.data());
        ApplyRope(x.data(), d, t, s.rope_base, +1);
        const int64_t h = g * group + j;
        FromFloat(x.data(), DType::kF16, q + ((layer * tokens + t) * s.q_heads + h) * d, d);
      }
    }
  });
  if (ood_lowvar > 0) {
    AddLowVarianceQueryPart(model, head, layer, g, tokens, ood, ood_lowvar, ood_lowvar_spread, seed,
                            q, k);
  }
}

}  // namespace

absl::Status WriteSynthTrace(const SynthModel& model, int64_t tokens, double ood, uint64_t seed,
                             const std::string& prefix, double ood_lowvar,
                             double ood_lowvar_spread) {
  const SynthShape& s = model.shape;
  if (tokens < 2) return absl::InvalidArgumentError("synth: need at least 2 tokens");
  std::vector<uint16_t> q(static_cast<size_t>(s.layers * tokens * s.q_heads * s.head_dim));
  std::vector<uint16_t> k(static_cast<size_t>(s.layers * tokens * s.kv_heads * s.head_dim));
  std::vector<uint16_t> v(k.size());
  for (int64_t l = 0; l < s.layers; ++l) {
    for (int64_t g = 0; g < s.kv_heads; ++g) {
      GenerateHead(model, model.heads[l * s.kv_heads + g], l, g, tokens, ood, ood_lowvar,
                   ood_lowvar_spread, seed, q.data(), k.data(), v.data());
    }
  }
  KVWAVE_RETURN_IF_ERROR(trace::WriteNpy(prefix + "_q.npy", DType::kF16,
                                         {s.layers, tokens, s.q_heads, s.head_dim}, q.data()));
  KVWAVE_RETURN_IF_ERROR(trace::WriteNpy(prefix + "_k.npy", DType::kF16,
                                         {s.layers, tokens, s.kv_heads, s.head_dim}, k.data()));
  KVWAVE_RETURN_IF_ERROR(trace::WriteNpy(prefix + "_v.npy", DType::kF16,
                                         {s.layers, tokens, s.kv_heads, s.head_dim}, v.data()));
  std::ofstream json(prefix + ".json");
  json << absl::StrCat(
      "{\n \"synthetic\": true,\n \"tokens\": ", tokens, ",\n \"layers\": ", s.layers,
      ",\n \"q_heads\": ", s.q_heads, ",\n \"kv_heads\": ", s.kv_heads,
      ",\n \"head_dim\": ", s.head_dim, ",\n \"rank\": ", s.rank, ",\n \"ood\": ", ood,
      ",\n \"ood_lowvar\": ", ood_lowvar, ",\n \"ood_lowvar_spread\": ", ood_lowvar_spread,
      ",\n \"seed\": ", seed, ",\n \"rope\": \"rotate-half, base ", s.rope_base,
      ", positions 0..N-1\"\n}\n");
  if (!json.good()) return absl::InternalError(prefix + ".json: write failed");
  return absl::OkStatus();
}

}  // namespace kvwave::bench
