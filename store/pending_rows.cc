#include "store/pending_rows.h"

#include <numeric>

#include "absl/strings/str_cat.h"
#include "store/segment.h"

namespace kvwave::store {

PendingRows::PendingRows(const std::vector<bool>& empty, std::shared_ptr<RowFetcher> fetcher)
    : clusters_(empty.size()),
      state_(new std::atomic<uint8_t>[empty.size()]),
      fetcher_(std::move(fetcher)) {
  int64_t resident = 0;
  for (size_t c = 0; c < clusters_; ++c) {
    state_[c].store(empty[c] ? kResident : kAbsent, std::memory_order_relaxed);
    resident += empty[c] ? 1 : 0;
  }
  // Relaxed: the object is published to other threads with the segment that owns it.
  resident_.store(resident, std::memory_order_relaxed);
}

absl::Status PendingRows::lost_reason() const {
  absl::MutexLock lock(&mu_);
  return lost_;
}

std::vector<int32_t> PendingRows::Claim(std::span<const int32_t> wanted) {
  std::vector<int32_t> claimed;
  for (int32_t c : wanted) {
    uint8_t expected = kAbsent;
    // Acquire-release: the winner owns the cluster's rows until it publishes or abandons them.
    if (state_[c].compare_exchange_strong(expected, kFetching, std::memory_order_acq_rel)) {
      claimed.push_back(c);
    }
  }
  return claimed;
}

std::vector<int32_t> PendingRows::ClaimAll() {
  std::vector<int32_t> all(clusters_);
  std::iota(all.begin(), all.end(), 0);
  return Claim(all);
}

void PendingRows::Publish(std::span<const int32_t> clusters) {
  if (clusters.empty()) return;
  for (int32_t c : clusters) state_[c].store(kResident, std::memory_order_release);
  // Release: a reader that sees the count complete sees every row written before it.
  resident_.fetch_add(static_cast<int64_t>(clusters.size()), std::memory_order_release);
  absl::MutexLock lock(&mu_);
  settled_.SignalAll();
}

void PendingRows::Abandon(std::span<const int32_t> clusters, const absl::Status& why, bool lost) {
  if (clusters.empty()) return;
  absl::MutexLock lock(&mu_);
  if (lost) {
    if (lost_.ok()) lost_ = why;
    lost_any_.store(true, std::memory_order_release);
  }
  for (int32_t c : clusters) state_[c].store(lost ? kLost : kAbsent, std::memory_order_release);
  settled_.SignalAll();
}

void PendingRows::WaitSettled(std::span<const int32_t> clusters) {
  absl::MutexLock lock(&mu_);
  for (int32_t c : clusters) {
    while (state(c) == kFetching) settled_.Wait(&mu_);
  }
}

absl::Status EnsureClusters(std::span<const ClusterWant> wants) {
  std::vector<RowClaim> claims;
  bool waiting = false;
  for (const ClusterWant& w : wants) {
    PendingRows* rows = w.segment->pending();
    if (rows == nullptr || rows->all_resident()) continue;
    RowClaim claim{w.segment, rows->Claim(w.clusters)};
    if (!claim.clusters.empty()) claims.push_back(std::move(claim));
    waiting = true;
  }
  if (!waiting) return absl::OkStatus();
  absl::Status fetched;
  // Normally one fetcher (the engine's remote tier); group by it all the same.
  while (!claims.empty()) {
    RowFetcher* f = claims.front().segment->pending()->fetcher();
    std::vector<RowClaim> batch, rest;
    for (RowClaim& c : claims) {
      (c.segment->pending()->fetcher() == f ? batch : rest).push_back(std::move(c));
    }
    fetched.Update(f->FetchClaimed(batch));
    claims = std::move(rest);
  }
  for (const ClusterWant& w : wants) {
    PendingRows* rows = w.segment->pending();
    if (rows == nullptr || rows->all_resident()) continue;
    rows->WaitSettled(w.clusters);
    for (int32_t c : w.clusters) {
      switch (rows->state(c)) {
        case PendingRows::kResident:
          break;
        case PendingRows::kLost:
          return absl::DataLossError(absl::StrCat(
              "the KV of an attached remote prefix block is lost (", rows->lost_reason().message(),
              "); close the context and open it again to prefill that block"));
        default:
          return absl::UnavailableError(absl::StrCat(
              "the KV of an attached remote prefix block could not be fetched (",
              fetched.ok() ? "another fetch failed" : fetched.message(), "); try again"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status EnsureAllRows(const Segment& segment) {
  PendingRows* rows = segment.pending();
  if (rows == nullptr || rows->all_resident()) return absl::OkStatus();
  ClusterWant want{&segment, {}};
  want.clusters.resize(rows->num_clusters());
  std::iota(want.clusters.begin(), want.clusters.end(), 0);
  return EnsureClusters(std::span<const ClusterWant>(&want, 1));
}

}  // namespace kvwave::store
