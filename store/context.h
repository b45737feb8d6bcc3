// A context: one sequence's KV cache, for all layers and KV heads.
//
// Per (layer, KV head) it holds the sealed segments, in position order, and the tail of tokens not
// yet sealed. Positions run 0.. in append order; all KV heads of a layer always hold the same
// number of tokens, while layers may differ (layers are appended independently).
//
// Thread-safety: each layer has its own reader/writer lock. Writers (Append, Seal) take it
// exclusively, readers (Attend, Retrieve, Gather) shared. Context-wide fields are immutable or
// atomic. The engine holds contexts by shared_ptr, so a closed context lives until its last
// in-flight call returns.
#ifndef KVWAVE_STORE_CONTEXT_H_
#define KVWAVE_STORE_CONTEXT_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "store/host_memory.h"
#include "store/model_shape.h"
#include "store/prefix_hash.h"
#include "store/prefix_registry.h"
#include "store/segment.h"

namespace kvwave::index {
class GraphIndex;  // index/graph_index.h; store only holds graphs (built in engine/graph_ops)
}  // namespace kvwave::index

namespace kvwave::store {

// Unsealed tokens of one (layer, KV head): key and value rows in position order.
class Tail {
 public:
  Tail(int32_t head_dim, DType dtype, HostAllocator* allocator)
      : row_bytes_(static_cast<size_t>(head_dim) * ElementSize(dtype)), allocator_(allocator) {}

  // Appends n rows read with a stride of `src_stride` bytes; takes `charge` (n rows of K and V).
  // On error nothing changes.
  [[nodiscard]] absl::Status Append(const std::byte* k, const std::byte* v, int64_t n,
                                    size_t src_stride, MemoryCharge charge);
  // Removes the first n rows; returns their charge.
  MemoryCharge DropFront(int64_t n);
  // Starts an empty tail at `position` (after an attached shared prefix). REQUIRES: size() == 0.
  void StartAt(int64_t position);

  int64_t size() const { return size_; }
  int64_t first_position() const { return first_position_; }
  size_t row_bytes() const { return row_bytes_; }
  const std::byte* key_row(int64_t i) const { return keys_.data() + (start_ + i) * row_bytes_; }
  const std::byte* value_row(int64_t i) const { return values_.data() + (start_ + i) * row_bytes_; }

 private:
  // Room for `rows` live rows after start_: moves the live rows to the front and/or grows.
  absl::Status Reserve(int64_t rows);
  size_t row_bytes_;
  HostAllocator* allocator_;
  // capacity_ rows each, at most max(2 x peak rows held, peak + the append that grew it); the
  // slack is not charged to the budget.
  HostBuffer keys_, values_;
  int64_t capacity_ = 0;
  int64_t start_ = 0;  // buffer row of the first live row: DropFront moves no rows
  int64_t size_ = 0;
  int64_t first_position_ = 0;
  MemoryCharge charge_;
};

// A seal queued for one layer: its token count (from the tail's front, at the time it runs) and
// the memory reserved for its segments when the Append that completed it was admitted.
struct PendingSeal {
  int64_t tokens = 0;
  MemoryCharge reserved;
};

struct HeadKv {
  std::vector<std::shared_ptr<const Segment>> segments;  // position order, contiguous
  Tail tail;
  // RetrievalAttention (issue 19, engine/graph_ops.h): graphs[i] belongs to segments[i] (null, or
  // i >= graphs.size(): none); `queries` holds the prefill queries of the tail's first
  // query_tokens tokens ([query_tokens x group x head_dim] float32), charged by query_charge,
  // until the seal of those tokens builds their graph and releases them.
  std::vector<std::shared_ptr<const index::GraphIndex>> graphs;
  std::vector<float> queries;
  int64_t query_tokens = 0;
  MemoryCharge query_charge;
  explicit HeadKv(Tail t) : tail(std::move(t)) {}
};

// Prefix-sharing state of a context opened with token ids: the chain hashes of its full blocks,
// the blocks attached or registered so far (pinned until Close), and the segments of blocks that
// some layers have sealed but not all.
struct PrefixState {
  std::vector<int32_t> token_ids;
  std::string name_space;
  std::string model_id;
  std::vector<BlockHash> hashes;  // one per full block of token_ids
  bool may_register = true;       // false: attach shared blocks, never register this one's
  absl::Mutex mu;
  PrefixAttachment attachment ABSL_GUARDED_BY(mu);          // blocks [0, attachment.blocks.size())
  std::vector<BlockSegments> building ABSL_GUARDED_BY(mu);  // [block][layer * kv_heads + head]
  std::vector<int32_t> layers_sealed ABSL_GUARDED_BY(mu);   // [block]
};

class Context {
 public:
  struct Layer {
    mutable std::shared_mutex mu;
    std::vector<HeadKv> heads;  // [kv_heads]; guarded by mu
    int64_t tokens = 0;         // guarded by mu
    // Tokens at the front of every tail promised to queued or running seals (guarded by mu).
    // They stay in the tails, attended exactly, until their segments are published.
    int64_t sealing_tokens = 0;
    // The layer's seal queue (engine/engine_impl.cc), run in order by one drainer at a time: a
    // background seal thread, or a caller that needs it done (Seal, an Append at the memory
    // limit). Invariant: pending non-empty and no drainer => a background drain is scheduled.
    absl::Mutex seal_mu;
    std::deque<PendingSeal> pending ABSL_GUARDED_BY(seal_mu);
    bool draining ABSL_GUARDED_BY(seal_mu) = false;   // a drainer owns the queue
    bool scheduled ABSL_GUARDED_BY(seal_mu) = false;  // a background drain is queued
    bool yield ABSL_GUARDED_BY(seal_mu) = false;      // a caller waits: the background drainer
                                                      // stops after its current seal
  };

  Context(uint64_t id, const ModelShape& shape, HostAllocator* allocator);

  // Memory an Open makes the daemon hold before any token is appended, charged to the budget
  // before the context is built: its layers and heads and, with `token_ids` ids, its prefix
  // state (the ids, one hash and bookkeeping per block of `block_tokens`).
  static int64_t SkeletonBytes(const ModelShape& shape, size_t token_ids, int64_t block_tokens);
  // Memory of `blocks` attached shared blocks: one segment pointer per (block, layer, KV head)
  // (the segments themselves are charged once, by whoever sealed or reloaded them).
  static int64_t AttachedBytes(const ModelShape& shape, int64_t blocks);
  // Takes the charge covering the two above; released with the context.
  void add_charge(MemoryCharge charge) { charge_.Merge(std::move(charge)); }

  uint64_t id() const { return id_; }
  const ModelShape& shape() const { return shape_; }
  Layer& layer(int32_t l) { return *layers_[l]; }
  const Layer& layer(int32_t l) const { return *layers_[l]; }

  // After the first explicit Seal, new segments use the decode segment size.
  bool decoding() const { return decoding_.load(std::memory_order_acquire); }
  // Set once, before the context is published to other threads.
  void set_prefix(std::unique_ptr<PrefixState> prefix) { prefix_ = std::move(prefix); }
  PrefixState* prefix() const { return prefix_.get(); }
  void set_decoding() { decoding_.store(true, std::memory_order_release); }
  // Set by the first Append whose prefill queries are kept for graphs (index.graph = on).
  bool has_queries() const { return has_queries_.load(std::memory_order_relaxed); }
  void set_has_queries() { has_queries_.store(true, std::memory_order_relaxed); }
  // Set by Close: queued seals are dropped, a running one stops at its next head.
  bool closing() const { return closing_.load(std::memory_order_acquire); }
  void set_closing() { closing_.store(true, std::memory_order_release); }
  // An error of a background seal (or its persistence), reported by the next Seal.
  void DeferError(const absl::Status& s) {
    absl::MutexLock lock(&error_mu_);
    deferred_error_.Update(s);
  }
  absl::Status TakeDeferredError() {
    absl::MutexLock lock(&error_mu_);
    return std::exchange(deferred_error_, absl::OkStatus());
  }

 private:
  const uint64_t id_;
  const ModelShape shape_;
  MemoryCharge charge_;  // SkeletonBytes + AttachedBytes; declared first, released last
  std::vector<std::unique_ptr<Layer>> layers_;
  std::unique_ptr<PrefixState> prefix_;  // null without token ids
  // Acquire/release: a thread that sees decoding() also sees the seal that set it.
  std::atomic<bool> decoding_{false};
  std::atomic<bool> closing_{false};  // acquire/release, like decoding_
  // Relaxed: a flag read for Info and error messages, set under the layer lock it is read
  // under where it matters (Retrieve, Attend).
  std::atomic<bool> has_queries_{false};
  absl::Mutex error_mu_;
  absl::Status deferred_error_ ABSL_GUARDED_BY(error_mu_);
};

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_CONTEXT_H_
