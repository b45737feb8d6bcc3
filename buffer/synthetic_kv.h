// Synthetic clustered contexts for the wave buffer's tests and the decode benchmark: one context
// of `layers` x `heads` store::HeadKv, its sealed segments built by store::Segment::Build from
// keys drawn around random cluster centres with the generating clustering as the index (an oracle
// index, not k-means: a 1M-token context builds in seconds), random values, the context's sink
// tokens in the first segment and an unsealed tail. Segments of another context can be shared as
// a prefix (the same Segment objects). Rows live in the given allocator (pinned for the GPU).
//
// Thread-safety: none (tests and benchmarks build and then read); const methods are thread-safe.
#ifndef KVWAVE_BUFFER_SYNTHETIC_KV_H_
#define KVWAVE_BUFFER_SYNTHETIC_KV_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "config/dtype.h"
#include "store/context.h"
#include "store/host_memory.h"
#include "store/segment.h"

namespace kvwave::buffer {

struct SyntheticShape {
  int layers = 1, heads = 8, d = 128;
  int64_t tokens = 8192;          // sealed + tail
  int64_t segment_tokens = 8192;  // tokens per sealed segment (the last may be shorter)
  int64_t tail_tokens = 64;       // left unsealed at the end
  int sink_tokens = 4;            // the first segment's steady rows
  int cluster_tokens = 16;        // mean tokens per cluster
  bool vary_sizes = true;         // cluster sizes uniform in [1, 2*cluster_tokens - 1]
  int big_cluster_every = 0;      // > 0: every n-th cluster has 8x the tokens (multi-page)
  float center_sd = 1.0f, noise_sd = 0.5f;
  uint64_t seed = 1;
  int q_heads = 0;  // of the context's ModelShape (0: 4 per KV head)
  uint64_t id = 1;  // the context's id
};

class SyntheticContext {
 public:
  // `prefix`: optional, a context whose first `prefix_segments` segments of every (layer, head)
  // this one shares (same objects); the shapes must agree on those segments.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SyntheticContext>> Create(
      const SyntheticShape& shape, store::HostAllocator* allocator,
      const SyntheticContext* prefix = nullptr, int prefix_segments = 0);

  const SyntheticShape& shape() const { return s_; }
  // The context (its ModelShape: the shape's layers, KV heads, d, bf16; q_heads).
  const store::Context& context() const { return *ctx_; }
  std::span<const store::HeadKv> layer(int l) const { return ctx_->layer(l).heads; }
  std::vector<store::HeadKv>& mutable_layer(int l) { return ctx_->layer(l).heads; }
  // Appends one token to every head of layer l (random K and V, around a random centre).
  [[nodiscard]] absl::Status AppendToken(int l, uint64_t seed);
  // K+V bytes of one layer's rows (real tokens only).
  int64_t layer_bytes() const;

 private:
  SyntheticContext() : budget_(int64_t{1} << 62) {}
  SyntheticShape s_;
  store::HostAllocator* allocator_ = nullptr;
  store::MemoryBudget budget_;
  std::unique_ptr<store::Context> ctx_;
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_SYNTHETIC_KV_H_
