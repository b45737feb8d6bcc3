#include "buffer/synthetic_kv.h"

#include <cmath>
#include <cstring>

#include "config/dtype.h"
#include "config/status_macros.h"
#include "gpu/attention_cpu.h"
#include "tbb/parallel_for.h"

namespace kvwave::buffer {
namespace {

// Cheap generator: splitmix64 stream, approximate normals (sum of 4 uniforms, unit variance).
struct Rng {
  uint64_t x;
  uint64_t Next() {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float Normal() {
    const uint64_t r = Next();
    float s = 0;
    for (int i = 0; i < 4; ++i) s += float((r >> (16 * i)) & 0xFFFF) * (1.0f / 65536.0f);
    return (s - 2.0f) * 1.7320508f;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<SyntheticKv>> SyntheticKv::Create(const SyntheticShape& shape,
                                                                 store::HostAllocator* allocator) {
  auto kv = std::unique_ptr<SyntheticKv>(new SyntheticKv);
  SyntheticKv& x = *kv;
  x.s_ = shape;
  const int d = shape.d;
  const int64_t U = kv->units(), C = shape.clusters;
  x.row_bytes_ = d * sizeof(uint16_t);
  x.rows_.resize(U);
  x.row_offset_.resize(U);
  x.cluster_row_.resize(U);
  x.sizes_.resize(U);
  int64_t total = 0;
  for (int64_t u = 0; u < U; ++u) {
    Rng rng{shape.seed * 1000003 + u};
    auto& sizes = x.sizes_[u];
    auto& crow = x.cluster_row_[u];
    sizes.resize(C);
    crow.resize(C);
    int64_t rows = 0, tokens = 0;
    for (int64_t c = 0; c < C; ++c) {
      sizes[c] = shape.vary_sizes ? 1 + int32_t(rng.Next() % (2 * shape.cluster_tokens - 1))
                                  : shape.cluster_tokens;
      crow[c] = rows;
      rows += (sizes[c] + 7) / 8 * 8;
      tokens += sizes[c];
    }
    x.rows_[u] = rows;
    x.row_offset_[u] = total;
    total += rows;
    if (u == 0) x.tokens_per_unit_ = tokens + shape.steady_rows;
  }
  KVWAVE_ASSIGN_OR_RETURN(x.k_, store::HostBuffer::Allocate(allocator, total * x.row_bytes_));
  KVWAVE_ASSIGN_OR_RETURN(x.v_, store::HostBuffer::Allocate(allocator, total * x.row_bytes_));
  x.centroids_.resize(U);
  x.value_sums_.resize(U);
  x.steady_k_.resize(U);
  x.steady_v_.resize(U);
  tbb::parallel_for(int64_t{0}, U, [&](int64_t u) {
    Rng rng{shape.seed * 7919 + u * 104729 + 17};
    auto* k = reinterpret_cast<uint16_t*>(x.k_.data()) + x.row_offset_[u] * d;
    auto* v = reinterpret_cast<uint16_t*>(x.v_.data()) + x.row_offset_[u] * d;
    std::memset(k, 0, x.rows_[u] * x.row_bytes_);
    std::memset(v, 0, x.rows_[u] * x.row_bytes_);
    auto& cen = x.centroids_[u];
    auto& vs = x.value_sums_[u];
    cen.assign(C * d, 0.f);
    vs.assign(C * d, 0.f);
    std::vector<float> centre(d);
    for (int64_t c = 0; c < C; ++c) {
      for (auto& z : centre) z = shape.center_sd * rng.Normal();
      const int32_t n = x.sizes_[u][c];
      for (int32_t t = 0; t < n; ++t) {
        const int64_t row = x.cluster_row_[u][c] + t;
        for (int e = 0; e < d; ++e) {
          const uint16_t kb = FloatToBf16(centre[e] + shape.noise_sd * rng.Normal());
          const uint16_t vb = FloatToBf16(rng.Normal());
          k[row * d + e] = kb;
          v[row * d + e] = vb;
          cen[c * d + e] += Bf16ToFloat(kb);
          vs[c * d + e] += Bf16ToFloat(vb);
        }
      }
      // The mean, rounded to bf16 like the keys: the wave buffer scores with a bf16 copy of the
      // centroids (WaveBufferOptions::bf16_scores), which then ranks exactly as the reference.
      for (int e = 0; e < d; ++e)
        cen[c * d + e] = Bf16ToFloat(FloatToBf16(cen[c * d + e] / float(n)));
    }
    auto& sk = x.steady_k_[u];
    auto& sv = x.steady_v_[u];
    sk.resize(int64_t{shape.steady_rows} * d);
    sv.resize(sk.size());
    for (size_t i = 0; i < sk.size(); ++i) {
      sk[i] = FloatToBf16(shape.center_sd * rng.Normal());
      sv[i] = FloatToBf16(rng.Normal());
    }
  });
  return kv;
}

std::vector<UnitLayout> SyntheticKv::Units() const {
  std::vector<UnitLayout> out(units());
  for (int64_t u = 0; u < units(); ++u) {
    UnitLayout& l = out[u];
    l.k = k(u);
    l.v = v(u);
    l.cluster_row = cluster_row_[u].data();
    l.sizes = sizes_[u].data();
    l.centroids = centroids_[u].data();
    l.value_sums = value_sums_[u].data();
    l.steady_k = reinterpret_cast<const std::byte*>(steady_k_[u].data());
    l.steady_v = reinterpret_cast<const std::byte*>(steady_v_[u].data());
    l.steady_rows = s_.steady_rows;
  }
  return out;
}

absl::Status SyntheticKv::ReferenceAttend(int64_t unit, const float* q, int64_t r, int64_t e,
                                          float* out, float* lse) const {
  namespace cpu = gpu::cpu;
  const int g = s_.g, d = s_.d;
  const int64_t C = s_.clusters;
  const float scale = 1.0f / std::sqrt(float(d));
  std::vector<float> logits(g * C), scores(C);
  cpu::CentroidLogits(q, g, d, scale, centroids_[unit].data(), C, logits.data());
  cpu::GroupSoftmaxSum(logits.data(), g, C, sizes_[unit].data(), scores.data());
  std::vector<int32_t> order(r + e);
  const int64_t got = cpu::TopK(scores.data(), C, r + e, order.data());
  const int64_t nr = std::min(r, got);
  std::vector<cpu::KvSpan> spans;
  spans.push_back({steady_k_[unit].data(), steady_v_[unit].data(), s_.steady_rows});
  for (int64_t i = 0; i < nr; ++i) {
    const int32_t c = order[i];
    const int64_t row = cluster_row_[unit][c];
    spans.push_back({k(unit) + row * row_bytes_, v(unit) + row * row_bytes_, sizes_[unit][c]});
  }
  KVWAVE_RETURN_IF_ERROR(cpu::ExactAttention(q, g, d, scale, DType::kBF16, spans, out, lse));
  std::vector<float> eo(g * d), el(g);
  KVWAVE_RETURN_IF_ERROR(cpu::EstimateAttention(
      q, g, d, scale, centroids_[unit].data(), value_sums_[unit].data(), sizes_[unit].data(), C,
      std::span<const int32_t>(order.data() + nr, got - nr), eo.data(), el.data()));
  cpu::MergeLse(out, lse, eo.data(), el.data(), g, d);
  return absl::OkStatus();
}

}  // namespace kvwave::buffer
