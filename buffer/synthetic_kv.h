// Synthetic clustered KV for the decode benchmark and the wave-buffer tests: every (layer, KV
// head) unit holds `clusters` clusters laid out cluster-contiguous in pinned host memory (the
// store::Segment layout: each cluster starts on a page of 8 rows, zero padding), with keys drawn
// around random cluster centres, random values, the exact centroids and value sums, and a steady
// zone. The clustering is the generating one (an oracle index), not k-means. Also the CPU
// reference of tripartite attention over it, built from gpu/attention_cpu.h.
//
// Thread-safety: immutable after Create; const methods are thread-safe.
#ifndef KVWAVE_BUFFER_SYNTHETIC_KV_H_
#define KVWAVE_BUFFER_SYNTHETIC_KV_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "buffer/wave_buffer.h"
#include "store/host_memory.h"

namespace kvwave::buffer {

struct SyntheticShape {
  int layers = 1, heads = 8, g = 4, d = 128;
  int64_t clusters = 1024;  // per unit
  int cluster_tokens = 16;  // mean tokens per cluster
  bool vary_sizes = false;  // sizes uniform in [1, 2*cluster_tokens - 1] instead of fixed
  int steady_rows = 64;     // sinks + local window, kept on the GPU
  float center_sd = 1.0f, noise_sd = 0.5f;
  uint64_t seed = 1;
};

class SyntheticKv {
 public:
  // K/V rows go to `allocator` (pinned for the GPU path).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SyntheticKv>> Create(
      const SyntheticShape& shape, store::HostAllocator* allocator);

  std::vector<UnitLayout> Units() const;
  const SyntheticShape& shape() const { return s_; }
  int64_t units() const { return int64_t{s_.layers} * s_.heads; }
  int64_t rows(int64_t unit) const { return rows_[unit]; }  // clustered rows incl. padding
  const std::byte* k(int64_t unit) const { return k_.data() + row_offset_[unit] * row_bytes_; }
  const std::byte* v(int64_t unit) const { return v_.data() + row_offset_[unit] * row_bytes_; }
  // Tokens per unit (steady + clustered) and K+V bytes of all units (real rows only).
  int64_t tokens_per_unit() const { return tokens_per_unit_; }
  int64_t kv_bytes() const { return 2 * tokens_per_unit_ * units() * int64_t(row_bytes_); }

  // CPU tripartite attention of unit's g query heads q [g x d]: steady + top-r clusters exact,
  // next e clusters estimated, merged. out [g x d], lse [g].
  [[nodiscard]] absl::Status ReferenceAttend(int64_t unit, const float* q, int64_t r, int64_t e,
                                             float* out, float* lse) const;

 private:
  SyntheticShape s_;
  size_t row_bytes_ = 0;
  int64_t tokens_per_unit_ = 0;
  store::HostBuffer k_, v_;
  std::vector<int64_t> rows_, row_offset_;
  std::vector<std::vector<int64_t>> cluster_row_;
  std::vector<std::vector<int32_t>> sizes_;
  std::vector<std::vector<float>> centroids_, value_sums_;
  std::vector<std::vector<uint16_t>> steady_k_, steady_v_;
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_SYNTHETIC_KV_H_
