#include "remote/kv_fetcher.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <deque>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "remote/block_format.h"
#include "remote/split_segment.h"
#include "spdlog/spdlog.h"

namespace kvwave::remote {

RemoteRows::RemoteRows(const std::vector<bool>& empty, std::shared_ptr<KvFetcher> fetcher)
    : store::PendingRows(empty, std::move(fetcher)) {}

KvFetcher::KvFetcher(std::shared_ptr<RedisCluster> cluster, KvFetcherOptions options)
    : cluster_(std::move(cluster)), options_(options) {
  for (int i = 0; i < options_.threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

KvFetcher::~KvFetcher() { Stop(); }

void KvFetcher::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    queue_.clear();
  }
  for (std::thread& t : workers_) {
    if (!t.joinable()) continue;
    // A worker never drops the last reference while the tier holds one (the tier stops the
    // workers first); detach rather than join itself should that change.
    if (t.get_id() == std::this_thread::get_id()) {
      t.detach();
    } else {
      t.join();
    }
  }
  workers_.clear();
}

KvFetcher::UrgentScope::UrgentScope(KvFetcher* fetcher) : fetcher_(fetcher) {
  absl::MutexLock lock(&fetcher_->mu_);
  ++fetcher_->urgent_;
}

KvFetcher::UrgentScope::~UrgentScope() {
  if (fetcher_ != nullptr) fetcher_->EndUrgent();
}

void KvFetcher::EndUrgent() {
  absl::MutexLock lock(&mu_);
  --urgent_;
  urgent_end_ = Clock::now();
}

bool KvFetcher::WaitQuiet() {
  absl::MutexLock lock(&mu_);
  bool counted = false;
  for (;;) {
    if (stop_) return false;
    const Clock::time_point ready =
        urgent_end_ + std::chrono::milliseconds(options_.behind_quiet_ms);
    const Clock::time_point now = Clock::now();
    if (urgent_ == 0 && now >= ready) break;
    if (!counted) {
      behind_held_.fetch_add(1, std::memory_order_relaxed);
      counted = true;
    }
    ++held_;
    if (urgent_ > 0) {
      mu_.Await(absl::Condition(
          +[](KvFetcher* f)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(f->mu_) { return f->stop_ || f->urgent_ == 0; },
          this));
    } else {
      // Until the quiet time has passed, unless an urgent read starts (or Stop) first.
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](KvFetcher* f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(f->mu_) {
                                 return f->stop_ || f->urgent_ > 0;
                               },
                               this),
                           absl::FromChrono(ready - now));
    }
    --held_;
  }
  return true;
}

void KvFetcher::TEST_WaitBehindHeld() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](KvFetcher* f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(f->mu_) { return f->held_ > 0; }, this));
}

bool KvFetcher::IsLost(const store::BlockHash& hash, uint64_t generation) const {
  absl::MutexLock lock(&mu_);
  return lost_.contains({hash, generation});
}

void KvFetcher::MarkLost(const RemoteRows& rows) {
  lost_segments_.fetch_add(1, std::memory_order_relaxed);
  absl::MutexLock lock(&mu_);
  if (lost_.size() < 65536) lost_.insert({rows.hash, rows.generation});
}

namespace {

// A run of adjacent claimed clusters [first, last] of one claim, and its GETRANGE commands.
struct Range {
  size_t claim = 0;
  size_t first = 0, last = 0;  // indices into the claim's clusters
  uint64_t offset = 0, bytes = 0;
  size_t cmd0 = 0, cmds = 0;
};

}  // namespace

struct KvFetcher::Plan {
  std::deque<std::string> strings;  // the commands' arguments (stable addresses)
  std::vector<Command> cmds;
  std::vector<Range> ranges;
};

KvFetcher::Plan KvFetcher::PlanRanges(std::span<store::RowClaim> claims) {
  Plan plan;
  for (size_t k = 0; k < claims.size(); ++k) {
    const store::Segment& seg = *claims[k].segment;
    const auto& rows = *static_cast<const RemoteRows*>(seg.pending());
    const std::vector<int32_t>& cl = claims[k].clusters;
    for (size_t i = 0; i < cl.size();) {
      Range r{k, i, i, ClusterKvOffset(seg, cl[i]), ClusterKvBytes(seg, cl[i]), plan.cmds.size(),
              0};
      while (r.last + 1 < cl.size() && cl[r.last + 1] == cl[r.last] + 1) {
        r.bytes += ClusterKvBytes(seg, cl[++r.last]);
      }
      i = r.last + 1;
      const uint64_t end = r.offset + r.bytes;
      for (const RemoteRows::Part& p : rows.parts) {
        const uint64_t lo = std::max(r.offset, p.ref.offset);
        const uint64_t hi = std::min(end, p.ref.offset + p.ref.length);
        if (lo >= hi) continue;
        const std::string& key = plan.strings.emplace_back(
            PartKey(rows.name_space, rows.hash, rows.generation, p.index));
        const std::string& start =
            plan.strings.emplace_back(absl::StrCat(kPartHeaderBytes + (lo - p.ref.offset)));
        const std::string& stop =
            plan.strings.emplace_back(absl::StrCat(kPartHeaderBytes + (hi - p.ref.offset) - 1));
        plan.cmds.push_back({"GETRANGE", key, start, stop});
        ++r.cmds;
      }
      plan.ranges.push_back(r);
    }
  }
  return plan;
}

absl::Status KvFetcher::FetchClaimed(std::span<store::RowClaim> claims) {
  const UrgentScope urgent(this);
  const Plan plan = PlanRanges(claims);
  std::vector<absl::StatusOr<Reply>> replies = cluster_->RunMany(plan.cmds);
  on_demand_ranges_.fetch_add(static_cast<int64_t>(plan.cmds.size()), std::memory_order_relaxed);
  return Settle(claims, plan, replies, /*behind=*/false);
}

absl::Status KvFetcher::Settle(std::span<store::RowClaim> claims, const Plan& plan,
                               std::vector<absl::StatusOr<Reply>>& replies, bool behind) {
  absl::Status first_error;
  std::vector<std::vector<int32_t>> good(claims.size()), retry(claims.size()), lost(claims.size());
  std::vector<absl::Status> lost_why(claims.size());
  std::string assembled;
  for (const Range& r : plan.ranges) {
    const store::Segment& seg = *claims[r.claim].segment;
    const auto& rows = *static_cast<const RemoteRows*>(seg.pending());
    const std::vector<int32_t>& cl = claims[r.claim].clusters;
    auto mark = [&](std::vector<std::vector<int32_t>>& into) {
      for (size_t i = r.first; i <= r.last; ++i) into[r.claim].push_back(cl[i]);
    };
    absl::Status st;
    absl::string_view got;  // the range's bytes: the one reply's, or assembled from several
    assembled.clear();
    for (size_t c = r.cmd0; c < r.cmd0 + r.cmds && st.ok(); ++c) {
      if (!replies[c].ok()) {
        st = replies[c].status();
      } else if (replies[c]->is_error()) {
        st = absl::UnavailableError(absl::StrCat("remote: ", replies[c]->str()));
      } else if (!replies[c]->is_string()) {
        st = absl::NotFoundError("remote: a KV part is missing");
      } else if (r.cmds == 1) {
        got = replies[c]->str();
      } else {
        const absl::string_view part = replies[c]->str();
        assembled.append(part.data(), part.size());
        got = assembled;
      }
    }
    if (st.ok() && got.size() != r.bytes) {
      // GETRANGE of a key that is gone answers "": the part was evicted or deleted.
      st = absl::NotFoundError(
          absl::StrCat("remote block ", rows.hash.ToHex(), ": a KV part is missing or truncated"));
    }
    if (!st.ok()) {
      if (first_error.ok()) first_error = st;
      if (absl::IsNotFound(st) || absl::IsDataLoss(st)) {
        mark(lost);
        lost_why[r.claim] = st;
      } else {
        unavailable_.fetch_add(1, std::memory_order_relaxed);
        mark(retry);
      }
      continue;
    }
    (behind ? behind_bytes_ : on_demand_bytes_)
        .fetch_add(static_cast<int64_t>(r.bytes), std::memory_order_relaxed);
    uint64_t at = 0;
    for (size_t i = r.first; i <= r.last; ++i) {
      const int32_t c = cl[i];
      const uint64_t n = ClusterKvBytes(seg, c);
      const std::byte* bytes = reinterpret_cast<const std::byte*>(got.data()) + at;
      at += n;
      if (KvChecksum(bytes, n) != rows.cluster_checksums[c]) {
        lost[r.claim].push_back(c);
        lost_why[r.claim] = absl::DataLossError(absl::StrCat(
            "remote block ", rows.hash.ToHex(), ": cluster ", c, " fails its checksum"));
        if (first_error.ok()) first_error = lost_why[r.claim];
        continue;
      }
      CopyClusterRows(seg, c, bytes, rows.key_base(), rows.value_base());
      good[r.claim].push_back(c);
    }
  }
  for (size_t k = 0; k < claims.size(); ++k) {
    store::PendingRows* rows = claims[k].segment->pending();
    if (!behind) {
      on_demand_clusters_.fetch_add(static_cast<int64_t>(good[k].size()),
                                    std::memory_order_relaxed);
    }
    rows->Publish(good[k]);
    rows->Abandon(retry[k], first_error, /*lost=*/false);
    if (!lost[k].empty()) {
      spdlog::warn("remote: KV of an attached block lost: {}", lost_why[k].ToString());
      MarkLost(*static_cast<const RemoteRows*>(rows));
      rows->Abandon(lost[k], lost_why[k], /*lost=*/true);
    }
  }
  return first_error;
}

void KvFetcher::FetchBehind(std::vector<std::weak_ptr<const store::Segment>> segments) {
  absl::MutexLock lock(&mu_);
  if (stop_ || workers_.empty()) return;
  for (auto& s : segments) queue_.push_back(std::move(s));
}

void KvFetcher::WaitIdle() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](KvFetcher* f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(f->mu_) {
        return f->stop_ || (f->queue_.empty() && f->busy_ == 0);
      },
      this));
}

void KvFetcher::WorkerLoop() {
  // Behind the calls that wait for rows: the lowest nice value for this thread (failing to set
  // it only costs fairness). Not SCHED_IDLE: on a host kept busy by other work the rows would
  // hardly ever arrive.
  (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
  for (;;) {
    std::weak_ptr<const store::Segment> seg;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](KvFetcher* f)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(f->mu_) { return f->stop_ || !f->queue_.empty(); },
          this));
      if (stop_) return;
      seg = std::move(queue_.front());
      queue_.pop_front();
      ++busy_;
    }
    const bool go_on = FetchBehindSegment(seg);
    absl::MutexLock lock(&mu_);
    --busy_;
    if (!go_on) return;
  }
}

bool KvFetcher::FetchBehindSegment(const std::weak_ptr<const store::Segment>& weak) {
  const uint64_t chunk = static_cast<uint64_t>(std::max<int64_t>(1, options_.behind_chunk_bytes));
  for (int32_t next = 0;;) {
    if (!WaitQuiet()) return false;
    // Held only while a chunk is read: a context closed meanwhile frees its segment.
    const std::shared_ptr<const store::Segment> seg = weak.lock();
    if (seg == nullptr) return true;
    store::PendingRows* pending = seg->pending();
    if (pending == nullptr || pending->any_lost()) return true;
    const int32_t clusters = pending->num_clusters();
    // The next chunk: clusters [next, end) of at most `chunk` bytes (at least one cluster).
    std::vector<int32_t> wanted;
    uint64_t bytes = 0;
    int32_t end = next;
    for (; end < clusters && (end == next || bytes + ClusterKvBytes(*seg, end) <= chunk); ++end) {
      bytes += ClusterKvBytes(*seg, end);
      if (pending->state(end) == store::PendingRows::kAbsent) wanted.push_back(end);
    }
    if (end == next) {  // every cluster passed
      behind_segments_.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    next = end;
    store::RowClaim claim{seg.get(), pending->Claim(wanted)};
    if (claim.clusters.empty()) continue;
    const auto& rows = *static_cast<const RemoteRows*>(pending);
    const Plan plan = PlanRanges(std::span(&claim, 1));
    behind_ranges_.fetch_add(static_cast<int64_t>(plan.cmds.size()), std::memory_order_relaxed);
    // One pipeline on the block's node (every part of a block hashes to its slot).
    absl::StatusOr<std::vector<Reply>> got = cluster_->Pipeline(rows.slot, plan.cmds);
    std::vector<absl::StatusOr<Reply>> replies;
    replies.reserve(plan.cmds.size());
    for (size_t i = 0; i < plan.cmds.size(); ++i) {
      if (got.ok()) {
        replies.emplace_back(std::move((*got)[i]));
      } else {
        replies.emplace_back(got.status());
      }
    }
    const absl::Status st = Settle(std::span(&claim, 1), plan, replies, /*behind=*/true);
    // A node down or slow: left absent for on-demand fetches and a later attach; lost: the
    // segment's other clusters are left to on-demand fetches (which report the loss).
    if (!st.ok()) return true;
  }
}

KvFetchStats KvFetcher::stats() const {
  KvFetchStats s;
  s.on_demand_bytes = on_demand_bytes_.load(std::memory_order_relaxed);
  s.on_demand_ranges = on_demand_ranges_.load(std::memory_order_relaxed);
  s.on_demand_clusters = on_demand_clusters_.load(std::memory_order_relaxed);
  s.behind_bytes = behind_bytes_.load(std::memory_order_relaxed);
  s.behind_ranges = behind_ranges_.load(std::memory_order_relaxed);
  s.behind_segments = behind_segments_.load(std::memory_order_relaxed);
  s.behind_held = behind_held_.load(std::memory_order_relaxed);
  s.lost_segments = lost_segments_.load(std::memory_order_relaxed);
  s.unavailable = unavailable_.load(std::memory_order_relaxed);
  absl::MutexLock lock(&mu_);
  s.queued = static_cast<int64_t>(queue_.size());
  return s;
}

}  // namespace kvwave::remote
