// A sealed segment: up to S tokens of one (context, layer, KV head), stored cluster-contiguous.
//
// Row layout of K and V (row = head_dim elements of the model dtype):
//   [steady rows: the context's sink tokens, first segment only, never clustered]
//   [cluster 0: pages p0 .. p1) [cluster 1: pages p1 .. p2) ...
// Each cluster starts on a page boundary (page = page_tokens rows) and only its last page may be
// partly filled; padding rows are zero and belong to no token. token_of_row maps a row back to its
// token offset in the segment (-1 for padding); row_of_token is the inverse.
//
// Meta index (float32): per cluster the centroid (mean of member keys), size, and value sum.
// Empty clusters (size 0) own no pages and are masked by their size.
//
// Lifecycle: built once from a tail by Build() (or decoded by FromParts()), then immutable; held
// by shared_ptr so a shared prefix or an in-flight Attend keeps it alive. id() names it for its
// whole life and is never reused in the process (an attention backend's cache may key on it: a
// prefix block's segment attached by several contexts has one id). Thread-safety: all const
// methods are safe from any thread.
//
// A segment may carry its RetrievalAttention graph (index::GraphIndex, built by engine/graph_ops
// from the prefill queries of its tokens; opaque to store): attached once by SetGraph while the
// segment is still private to whoever built or loaded it, so it travels with the segment into
// shared prefix blocks and the persistence tier (store/persist.h PersistOptions::*_graph).
//
// Pending rows: a segment decoded from the remote tier may be published with only its steady
// rows and meta index resident (pending() != nullptr); the rows of cluster c may be read only
// once pending()->state(c) is kResident (EnsureClusters, store/pending_rows.h). Everything else
// (meta index, permutation, sizes) is immutable from creation as above.
#ifndef KVWAVE_STORE_SEGMENT_H_
#define KVWAVE_STORE_SEGMENT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "config/dtype.h"
#include "store/host_memory.h"
#include "store/pending_rows.h"

namespace kvwave::index {
class GraphIndex;  // index/graph_index.h
}  // namespace kvwave::index

namespace kvwave::store {

struct SegmentInput {
  int64_t first_position = 0;  // position of the segment's first token in the context
  int32_t num_tokens = 0;
  int32_t steady_tokens = 0;  // leading tokens kept out of the clusters (sinks)
  int32_t head_dim = 0;
  DType dtype = DType::kF32;
  int32_t page_tokens = 8;
  const std::byte* keys = nullptr;    // [num_tokens x head_dim] in token order
  const std::byte* values = nullptr;  // [num_tokens x head_dim] in token order
  // Clustering of the tokens [steady_tokens, num_tokens): assignment[i] is the cluster of token
  // steady_tokens + i; centroids [num_clusters x head_dim]; sizes [num_clusters].
  int32_t num_clusters = 0;
  std::span<const int32_t> assignment;
  std::span<const float> centroids;
  std::span<const int32_t> sizes;
};

// The parts of a sealed segment as stored (e.g. decoded from bytes), handed to Segment::FromParts,
// which checks that they are consistent before it builds the segment.
struct SegmentParts {
  int64_t first_position = 0;
  int32_t num_tokens = 0;
  int32_t steady_tokens = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kF32;
  int32_t page_tokens = 8;
  int32_t num_clusters = 0;
  HostBuffer keys;    // [rows x head_dim] in row order (cluster-contiguous, padding rows zero)
  HostBuffer values;  // [rows x head_dim]
  std::vector<float> centroids;   // [C x d]
  std::vector<int32_t> sizes;     // [C]
  std::vector<float> value_sums;  // [C x d]
  // [C] (see Segment::key_spreads), or empty: computed from the rows (zeros while they are
  // pending).
  std::vector<float> key_spreads;
  std::vector<int32_t> token_of_row;  // [rows], -1 for padding
  // Set when the cluster rows of keys/values are not written yet (a remote-attached block,
  // store/pending_rows.h): the steady rows must be; FromParts binds it to the row buffers.
  std::shared_ptr<PendingRows> pending;
};

class Segment {
 public:
  // Upper bound of the bytes Build charges for a segment of n tokens (for reserving up front).
  static int64_t MaxBytes(int32_t n, int32_t head_dim, DType dtype, int32_t page_tokens,
                          int32_t tokens_per_cluster);

  // Lays out the tokens cluster-contiguous, computes value sums, keeps the centroids rounded to
  // bf16 (round to nearest even; stored as float32), and takes the charge for its
  // bytes out of `reserved` (which must hold at least Bytes() of the result; the rest stays).
  // Errors: inconsistent input (assignment out of range, sizes that do not match it).
  // Why bf16 centroids: the GPU scores a bf16 copy of them on the tensor cores (half the bytes of
  // a call's largest read, bench/results/gpu_engine_run11_*); with bf16-exact centroids that copy
  // holds the same numbers as the float32 ones the CPU scores, so both backends rank alike up to
  // float32 rounding. Keys are bf16 or f16 already: the estimate moves by ~2^-9 of a logit.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const Segment>> Build(
      const SegmentInput& input, HostAllocator* allocator, MemoryCharge& reserved);

  // Bytes a segment of this plan charges (what Build and FromParts take out of `reserved`).
  static int64_t ChargedBytes(int64_t rows, int32_t num_tokens, int32_t num_clusters,
                              int32_t head_dim, DType dtype);

  // Rebuilds a segment from stored parts (no copy of the rows). Checks every invariant of the
  // layout: the row plan implied by sizes and page_tokens, the permutation (steady rows first,
  // each cluster's members contiguous from its first row, padding -1, every token exactly once),
  // and the buffer sizes. Errors: InvalidArgument naming the first mismatch (nothing taken from
  // `reserved`); InternalError when `reserved` holds less than ChargedBytes.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const Segment>> FromParts(
      SegmentParts parts, MemoryCharge& reserved);

  // Unique in the process, never reused (1, 2, ...).
  uint64_t id() const { return id_; }
  int64_t first_position() const { return first_position_; }
  int32_t num_tokens() const { return num_tokens_; }
  int32_t steady_tokens() const { return steady_tokens_; }
  int32_t num_clusters() const { return num_clusters_; }
  int32_t head_dim() const { return head_dim_; }
  DType dtype() const { return dtype_; }
  int32_t page_tokens() const { return page_tokens_; }
  size_t row_bytes() const { return row_bytes_; }
  // All rows of keys / values: [num_rows x head_dim] elements.
  std::span<const std::byte> key_bytes() const { return {keys_.data(), keys_.size()}; }
  std::span<const std::byte> value_bytes() const { return {values_.data(), values_.size()}; }
  const std::vector<int32_t>& token_of_rows() const { return token_of_row_; }  // [rows]
  int64_t num_rows() const { return static_cast<int64_t>(token_of_row_.size()); }
  int64_t bytes() const { return charge_.bytes(); }

  // Row r of keys / values.
  const std::byte* key_row(int64_t r) const { return keys_.data() + r * row_bytes_; }
  const std::byte* value_row(int64_t r) const { return values_.data() + r * row_bytes_; }
  // First row of cluster c, and its member count.
  int64_t cluster_row(int32_t c) const { return cluster_row_[c]; }
  int32_t cluster_size(int32_t c) const { return sizes_[c]; }
  // Rows of cluster c (its pages, padding included): [cluster_row(c), cluster_end_row(c)).
  int64_t cluster_end_row(int32_t c) const {
    return c + 1 < num_clusters_ ? cluster_row_[c + 1] : num_rows();
  }
  // Rows before the first cluster (the sinks' pages).
  int64_t steady_rows() const { return num_clusters_ > 0 ? cluster_row_[0] : num_rows(); }
  // The cluster that holds row r, or -1 for a steady row.
  int32_t cluster_of_row(int64_t r) const;

  // Null when every row is resident (always, except for a remote-attached segment).
  PendingRows* pending() const { return pending_.get(); }
  bool rows_resident() const { return pending_ == nullptr || pending_->all_resident(); }

  const std::vector<float>& centroids() const { return centroids_; }    // [C x d]
  const std::vector<float>& value_sums() const { return value_sums_; }  // [C x d]
  // [C]: the mean over dimensions of the variance of the cluster's member keys about its
  // centroid, sum_i |k_i - c|^2 / (size * d) (0 for an empty cluster, and for every cluster of a
  // segment attached with its rows still pending). The CPU estimation zone's spread correction
  // reads it (gpu/attention_cpu.h EstimateAttention).
  const std::vector<float>& key_spreads() const { return key_spreads_; }
  const std::vector<int32_t>& sizes() const { return sizes_; }  // [C]
  int32_t token_of_row(int64_t r) const { return token_of_row_[r]; }
  int64_t row_of_token(int32_t t) const { return row_of_token_[t]; }

  // The segment's RetrievalAttention graph over its tokens in token order, or null.
  const std::shared_ptr<const index::GraphIndex>& graph() const { return graph_; }
  // REQUIRES: no other thread can reach this segment yet (before it is published into a head,
  // registered as a prefix block, or returned by a load); called at most once.
  void SetGraph(std::shared_ptr<const index::GraphIndex> graph) { graph_ = std::move(graph); }

 private:
  Segment();
  // key_spreads_ from the rows and centroids (called where the rows are resident).
  void ComputeKeySpreads();
  uint64_t id_ = 0;
  int64_t first_position_ = 0;
  int32_t num_tokens_ = 0, steady_tokens_ = 0, num_clusters_ = 0, head_dim_ = 0;
  DType dtype_ = DType::kF32;
  int32_t page_tokens_ = 0;
  size_t row_bytes_ = 0;
  HostBuffer keys_, values_;
  std::vector<int64_t> cluster_row_;  // [C]
  std::vector<int32_t> sizes_;        // [C]
  std::vector<float> centroids_, value_sums_, key_spreads_;
  std::vector<int32_t> token_of_row_;  // [rows], -1 for padding
  std::vector<int64_t> row_of_token_;  // [num_tokens]
  std::shared_ptr<PendingRows> pending_;
  MemoryCharge charge_;
  std::shared_ptr<const index::GraphIndex> graph_;  // holds its own memory charge
};

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_SEGMENT_H_
