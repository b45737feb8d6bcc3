// Rows of a sealed segment that arrive after the segment is published: a prefix block attached
// from the remote tier (remote/kv_fetcher.h) is registered with its meta index (centroids, value
// sums, sizes, permutation) and its steady rows resident, and the key/value rows of its clusters
// "pending". Readers make the clusters they need resident with EnsureClusters before they read
// them; a background fetcher fills the rest.
//
// Lifecycle of one cluster's rows (states, an atomic per cluster):
//   kAbsent   -> kFetching   claimed by exactly one fetcher (compare-and-swap)
//   kFetching -> kResident   the fetcher wrote and verified the rows, then published them
//                            (release; a reader that sees kResident with acquire may read them).
//                            Final: resident rows never change again.
//   kFetching -> kAbsent     the fetch failed for a reason that may pass (a node down or slow):
//                            a later call tries again
//   kFetching -> kLost       the source no longer has the rows, or they failed verification
//                            (evicted, deleted, corrupt): final; the reason is kept
// Clusters without rows (size 0) start resident.
//
// Memory: the segment's row buffers are allocated and charged in full when the segment is
// created (store/segment.h FromParts), so a fetch never allocates and never fails for memory;
// the rows' pages are touched as they arrive.
//
// Thread-safety: all methods are thread-safe. Row bytes of a cluster are written only by the
// fetcher that claimed it, before it publishes; nobody reads them before kResident.
#ifndef KVWAVE_STORE_PENDING_ROWS_H_
#define KVWAVE_STORE_PENDING_ROWS_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace kvwave::store {

class Segment;
class RowFetcher;

class PendingRows {
 public:
  enum State : uint8_t { kAbsent = 0, kFetching = 1, kResident = 2, kLost = 3 };

  // `empty[c]` is true for clusters without rows (they start resident).
  PendingRows(const std::vector<bool>& empty, std::shared_ptr<RowFetcher> fetcher);
  virtual ~PendingRows() = default;
  PendingRows(const PendingRows&) = delete;
  PendingRows& operator=(const PendingRows&) = delete;

  int32_t num_clusters() const { return static_cast<int32_t>(clusters_); }
  // Acquire: pairs with Publish's release, so rows seen resident are complete.
  bool all_resident() const {
    return resident_.load(std::memory_order_acquire) == static_cast<int64_t>(clusters_);
  }
  int64_t resident_clusters() const { return resident_.load(std::memory_order_acquire); }
  State state(int32_t c) const {
    return static_cast<State>(state_[c].load(std::memory_order_acquire));
  }
  bool any_lost() const { return lost_any_.load(std::memory_order_acquire); }
  absl::Status lost_reason() const;
  RowFetcher* fetcher() const { return fetcher_.get(); }

  // kAbsent -> kFetching for each of `wanted` that is absent; returns those claimed.
  std::vector<int32_t> Claim(std::span<const int32_t> wanted);
  std::vector<int32_t> ClaimAll();
  // kFetching -> kResident (rows written and verified), release.
  void Publish(std::span<const int32_t> clusters);
  // kFetching -> kAbsent (`why` may pass), or kLost when `lost` (final).
  void Abandon(std::span<const int32_t> clusters, const absl::Status& why, bool lost);
  // Waits until none of `clusters` is kFetching.
  void WaitSettled(std::span<const int32_t> clusters);

  // Where the rows go (set once by Segment::FromParts; the segment's buffers).
  void Bind(std::byte* keys, std::byte* values) {
    keys_ = keys;
    values_ = values;
  }
  std::byte* key_base() const { return keys_; }
  std::byte* value_base() const { return values_; }

 private:
  const size_t clusters_;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;
  std::atomic<int64_t> resident_{0};
  std::atomic<bool> lost_any_{false};
  const std::shared_ptr<RowFetcher> fetcher_;
  std::byte* keys_ = nullptr;
  std::byte* values_ = nullptr;
  mutable absl::Mutex mu_;  // waits for kFetching to settle; the loss reason
  absl::CondVar settled_;
  absl::Status lost_ ABSL_GUARDED_BY(mu_);
};

// One segment's clusters claimed for fetching.
struct RowClaim {
  const Segment* segment = nullptr;  // segment->pending() != nullptr
  std::vector<int32_t> clusters;     // claimed (kFetching by the caller), ascending
};

// Where pending rows come from (remote/kv_fetcher.h).
class RowFetcher {
 public:
  virtual ~RowFetcher() = default;
  // Fetches, verifies and writes the rows of every claimed cluster, then Publishes or Abandons
  // each of them (all of them, before returning). Returns the first error (the caller turns the
  // clusters' final states into its status).
  virtual absl::Status FetchClaimed(std::span<RowClaim> claims) = 0;
};

// One segment's clusters a reader needs.
struct ClusterWant {
  const Segment* segment = nullptr;
  std::vector<int32_t> clusters;
};

// Makes every wanted cluster's rows resident: claims the absent ones and fetches them (one batch
// per fetcher), waits for those another thread is fetching. OK when all are resident; otherwise
// DataLoss (a wanted cluster is lost: the reason names the block) or Unavailable (a fetch
// failed for a reason that may pass; a later call tries again). Segments without pending rows
// cost one pointer test.
[[nodiscard]] absl::Status EnsureClusters(std::span<const ClusterWant> wants);
// Every cluster of `segment`.
[[nodiscard]] absl::Status EnsureAllRows(const Segment& segment);

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_PENDING_ROWS_H_
