#include "buffer/synthetic_kv.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "config/status_macros.h"
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

// One segment of `n` tokens at `first` (with `sinks` steady tokens) for unit seed `seed`.
absl::StatusOr<std::shared_ptr<const store::Segment>> MakeSegment(
    const SyntheticShape& s, int64_t first, int32_t n, int32_t sinks, uint64_t size_seed,
    uint64_t seed, store::HostAllocator* allocator, store::MemoryBudget& budget) {
  Rng sizes_rng{size_seed}, rng{seed};
  const int d = s.d;
  const int32_t clustered = n - sinks;
  // Cluster sizes summing to `clustered`.
  std::vector<int32_t> sizes;
  for (int32_t left = clustered; left > 0;) {
    int32_t z = s.vary_sizes ? 1 + int32_t(sizes_rng.Next() % (2 * s.cluster_tokens - 1))
                             : s.cluster_tokens;
    if (s.big_cluster_every > 0 && sizes.size() % s.big_cluster_every == 0) z *= 8;
    z = std::min(z, left);
    sizes.push_back(z);
    left -= z;
  }
  const int32_t C = static_cast<int32_t>(sizes.size());
  std::vector<int32_t> assignment(clustered);
  std::vector<float> centroids(int64_t{C} * d, 0.f), centre(d);
  std::vector<uint16_t> k(int64_t{n} * d), v(int64_t{n} * d);
  auto put = [&](int64_t t, const float* ks) {
    for (int e = 0; e < d; ++e) {
      k[t * d + e] = FloatToBf16(ks[e]);
      v[t * d + e] = FloatToBf16(rng.Normal());
    }
  };
  for (int32_t t = 0; t < sinks; ++t) {
    for (auto& z : centre) z = s.center_sd * rng.Normal();
    put(t, centre.data());
  }
  // Members of each cluster at random positions: a random permutation of the clustered tokens.
  std::vector<int32_t> order(clustered);
  for (int32_t i = 0; i < clustered; ++i) order[i] = i;
  for (int32_t i = clustered - 1; i > 0; --i) std::swap(order[i], order[rng.Next() % (i + 1)]);
  std::vector<float> row(d);
  for (int32_t c = 0, at = 0; c < C; ++c) {
    for (auto& z : centre) z = s.center_sd * rng.Normal();
    for (int32_t j = 0; j < sizes[c]; ++j, ++at) {
      const int32_t i = order[at];
      assignment[i] = c;
      for (int e = 0; e < d; ++e) row[e] = centre[e] + s.noise_sd * rng.Normal();
      put(sinks + i, row.data());
      for (int e = 0; e < d; ++e)
        centroids[int64_t{c} * d + e] += Bf16ToFloat(k[(sinks + i) * int64_t{d} + e]);
    }
    // The mean rounded to bf16 like the keys: bf16 scoring then ranks as float32 does.
    for (int e = 0; e < d; ++e) {
      float& x = centroids[int64_t{c} * d + e];
      x = Bf16ToFloat(FloatToBf16(x / float(sizes[c])));
    }
  }
  std::vector<std::byte> kb(int64_t{n} * d * ElementSize(DType::kBF16)), vb(kb.size());
  std::memcpy(kb.data(), k.data(), kb.size());
  std::memcpy(vb.data(), v.data(), vb.size());
  store::SegmentInput in;
  in.first_position = first;
  in.num_tokens = n;
  in.steady_tokens = sinks;
  in.head_dim = d;
  in.dtype = DType::kBF16;
  in.page_tokens = 8;
  in.keys = kb.data();
  in.values = vb.data();
  in.num_clusters = C;
  in.assignment = assignment;
  in.centroids = centroids;
  in.sizes = sizes;
  KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge charge,
                          budget.Reserve(store::Segment::MaxBytes(n, d, DType::kBF16, 8, 1)));
  return store::Segment::Build(in, allocator, charge);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SyntheticContext>> SyntheticContext::Create(
    const SyntheticShape& shape, store::HostAllocator* allocator, const SyntheticContext* prefix,
    int prefix_segments) {
  if (shape.layers < 1 || shape.heads < 1 || shape.d < 8 || shape.tokens < 0 ||
      shape.tail_tokens < 0 || shape.segment_tokens < 1 || shape.sink_tokens < 0 ||
      shape.cluster_tokens < 1)
    return absl::InvalidArgumentError("SyntheticContext: bad shape");
  auto x = std::unique_ptr<SyntheticContext>(new SyntheticContext);
  x->s_ = shape;
  x->allocator_ = allocator;
  const int64_t sealed = std::max<int64_t>(0, shape.tokens - shape.tail_tokens);
  std::vector<int64_t> starts;
  for (int64_t p = 0; p < sealed; p += shape.segment_tokens) starts.push_back(p);
  const int64_t U = int64_t{shape.layers} * shape.heads, S = static_cast<int64_t>(starts.size());
  std::vector<std::shared_ptr<const store::Segment>> segs(U * S);
  std::vector<absl::Status> errors(U * S);
  tbb::parallel_for(int64_t{0}, U * S, [&](int64_t i) {
    const int64_t u = i / S, j = i % S;
    const int l = static_cast<int>(u / shape.heads), h = static_cast<int>(u % shape.heads);
    if (prefix != nullptr && j < prefix_segments) {
      segs[i] = prefix->ctx_->layer(l).heads[h].segments[j];
      return;
    }
    const int64_t first = starts[j];
    const int32_t n = static_cast<int32_t>(std::min(shape.segment_tokens, sealed - first));
    const int32_t sinks = j == 0 ? std::min<int32_t>(shape.sink_tokens, n - 1) : 0;
    // Cluster sizes depend on the segment only: every head of a layer has as many clusters (as
    // k-means with a fixed tokens-per-cluster gives), so the budgets agree across heads.
    auto seg = MakeSegment(shape, first, n, std::max(sinks, 0), shape.seed * 31337 + j,
                           shape.seed * 1000003 + u * 7919 + j * 104729, allocator, x->budget_);
    if (!seg.ok()) {
      errors[i] = seg.status();
      return;
    }
    segs[i] = std::move(*seg);
  });
  for (const auto& e : errors) KVWAVE_RETURN_IF_ERROR(e);
  const size_t row_bytes = static_cast<size_t>(shape.d) * 2;
  store::ModelShape ms;
  ms.layers = shape.layers;
  ms.kv_heads = shape.heads;
  ms.q_heads = shape.q_heads > 0 ? shape.q_heads : 4 * shape.heads;
  ms.head_dim = shape.d;
  ms.dtype = DType::kBF16;
  x->ctx_ = std::make_unique<store::Context>(shape.id, ms, allocator);
  for (int l = 0; l < shape.layers; ++l) {
    x->ctx_->layer(l).tokens = shape.tokens;
    for (int h = 0; h < shape.heads; ++h) {
      store::HeadKv& head = x->ctx_->layer(l).heads[h];
      const int64_t u = int64_t{l} * shape.heads + h;
      for (int64_t j = 0; j < S; ++j) head.segments.push_back(segs[u * S + j]);
      head.tail.StartAt(sealed);
      const int64_t n = shape.tokens - sealed;
      if (n > 0) {
        Rng rng{shape.seed * 31 + u};
        std::vector<uint16_t> k(n * shape.d), v(n * shape.d);
        for (auto& z : k) z = FloatToBf16(shape.center_sd * rng.Normal());
        for (auto& z : v) z = FloatToBf16(rng.Normal());
        KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge charge,
                                x->budget_.Reserve(static_cast<int64_t>(2 * n * row_bytes)));
        KVWAVE_RETURN_IF_ERROR(head.tail.Append(reinterpret_cast<const std::byte*>(k.data()),
                                                reinterpret_cast<const std::byte*>(v.data()), n,
                                                row_bytes, std::move(charge)));
      }
    }
  }
  return x;
}

absl::Status SyntheticContext::AppendToken(int l, uint64_t seed) {
  Rng rng{seed};
  const size_t row_bytes = static_cast<size_t>(s_.d) * 2;
  std::vector<uint16_t> k(s_.d), v(s_.d);
  for (store::HeadKv& head : ctx_->layer(l).heads) {
    for (auto& z : k) z = FloatToBf16(s_.center_sd * rng.Normal());
    for (auto& z : v) z = FloatToBf16(rng.Normal());
    KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge charge,
                            budget_.Reserve(static_cast<int64_t>(2 * row_bytes)));
    KVWAVE_RETURN_IF_ERROR(head.tail.Append(reinterpret_cast<const std::byte*>(k.data()),
                                            reinterpret_cast<const std::byte*>(v.data()), 1,
                                            row_bytes, std::move(charge)));
  }
  return absl::OkStatus();
}

int64_t SyntheticContext::layer_bytes() const {
  return 2 * s_.tokens * s_.heads * int64_t{s_.d} * 2;
}

}  // namespace kvwave::buffer
