#include "remote/kv_fetcher.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <deque>

#include "absl/strings/str_cat.h"
#include "remote/block_format.h"
#include "remote/split_segment.h"
#include "spdlog/spdlog.h"

namespace kvwave::remote {

RemoteRows::RemoteRows(const std::vector<bool>& empty, std::shared_ptr<KvFetcher> fetcher)
    : store::PendingRows(empty, std::move(fetcher)) {}

KvFetcher::KvFetcher(std::shared_ptr<RedisCluster> cluster, int threads)
    : cluster_(std::move(cluster)) {
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
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

absl::Status KvFetcher::FetchClaimed(std::span<store::RowClaim> claims) {
  std::deque<std::string> strings;  // the commands' arguments (stable addresses)
  std::vector<Command> cmds;
  std::vector<Range> ranges;
  for (size_t k = 0; k < claims.size(); ++k) {
    const store::Segment& seg = *claims[k].segment;
    const auto& rows = *static_cast<const RemoteRows*>(seg.pending());
    const std::vector<int32_t>& cl = claims[k].clusters;
    for (size_t i = 0; i < cl.size();) {
      Range r{k, i, i, ClusterKvOffset(seg, cl[i]), ClusterKvBytes(seg, cl[i]), cmds.size(), 0};
      while (r.last + 1 < cl.size() && cl[r.last + 1] == cl[r.last] + 1) {
        r.bytes += ClusterKvBytes(seg, cl[++r.last]);
      }
      i = r.last + 1;
      const uint64_t end = r.offset + r.bytes;
      for (const RemoteRows::Part& p : rows.parts) {
        const uint64_t lo = std::max(r.offset, p.ref.offset);
        const uint64_t hi = std::min(end, p.ref.offset + p.ref.length);
        if (lo >= hi) continue;
        const std::string& key =
            strings.emplace_back(PartKey(rows.name_space, rows.hash, rows.generation, p.index));
        const std::string& start =
            strings.emplace_back(absl::StrCat(kPartHeaderBytes + (lo - p.ref.offset)));
        const std::string& stop =
            strings.emplace_back(absl::StrCat(kPartHeaderBytes + (hi - p.ref.offset) - 1));
        cmds.push_back({"GETRANGE", key, start, stop});
        ++r.cmds;
      }
      ranges.push_back(r);
    }
  }
  std::vector<absl::StatusOr<Reply>> replies = cluster_->RunMany(cmds);
  on_demand_ranges_.fetch_add(static_cast<int64_t>(cmds.size()), std::memory_order_relaxed);

  absl::Status first_error;
  std::vector<std::vector<int32_t>> good(claims.size()), retry(claims.size()), lost(claims.size());
  std::vector<absl::Status> lost_why(claims.size());
  std::string assembled;
  for (const Range& r : ranges) {
    const store::Segment& seg = *claims[r.claim].segment;
    const auto& rows = *static_cast<const RemoteRows*>(seg.pending());
    const std::vector<int32_t>& cl = claims[r.claim].clusters;
    auto mark = [&](std::vector<std::vector<int32_t>>& into) {
      for (size_t i = r.first; i <= r.last; ++i) into[r.claim].push_back(cl[i]);
    };
    absl::Status st;
    assembled.clear();
    for (size_t c = r.cmd0; c < r.cmd0 + r.cmds && st.ok(); ++c) {
      if (!replies[c].ok()) {
        st = replies[c].status();
      } else if (replies[c]->is_error()) {
        st = absl::UnavailableError(absl::StrCat("remote: ", replies[c]->str()));
      } else if (!replies[c]->is_string()) {
        st = absl::NotFoundError("remote: a KV part is missing");
      } else {
        const absl::string_view got = replies[c]->str();
        assembled.append(got.data(), got.size());
      }
    }
    if (st.ok() && assembled.size() != r.bytes) {
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
    on_demand_bytes_.fetch_add(static_cast<int64_t>(r.bytes), std::memory_order_relaxed);
    uint64_t at = 0;
    for (size_t i = r.first; i <= r.last; ++i) {
      const int32_t c = cl[i];
      const uint64_t n = ClusterKvBytes(seg, c);
      const std::byte* bytes = reinterpret_cast<const std::byte*>(assembled.data()) + at;
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
    on_demand_clusters_.fetch_add(static_cast<int64_t>(good[k].size()), std::memory_order_relaxed);
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
  // Behind the calls that wait for rows: a lower nice value for this thread (failing to lower
  // it only costs fairness).
  (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
  std::vector<BulkValue> scratch;
  for (;;) {
    std::shared_ptr<const store::Segment> seg;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](KvFetcher* f)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(f->mu_) { return f->stop_ || !f->queue_.empty(); },
          this));
      if (stop_) return;
      seg = queue_.front().lock();
      queue_.pop_front();
      ++busy_;
    }
    if (seg != nullptr && !seg->rows_resident() && !seg->pending()->any_lost()) {
      FetchSegment(*seg, scratch);
    }
    seg.reset();  // may free the segment (its context closed): before reporting idle
    absl::MutexLock lock(&mu_);
    --busy_;
  }
}

void KvFetcher::FetchSegment(const store::Segment& seg, std::vector<BulkValue>& values) {
  auto& rows = *static_cast<RemoteRows*>(seg.pending());
  std::vector<std::string> keys;
  for (const RemoteRows::Part& p : rows.parts) {
    keys.push_back(PartKey(rows.name_space, rows.hash, rows.generation, p.index));
  }
  absl::Status st = cluster_->GetMany(rows.slot, keys, values);
  if (!st.ok()) {
    unavailable_.fetch_add(1, std::memory_order_relaxed);
    return;  // left absent: on-demand fetches and a later attach try again
  }
  std::string assembled;
  absl::string_view kv;
  for (size_t i = 0; i < rows.parts.size() && st.ok(); ++i) {
    const RemoteRows::Part& p = rows.parts[i];
    if (values[i].nil) {
      st = absl::NotFoundError(
          absl::StrCat("remote block ", rows.hash.ToHex(), ": KV part ", p.index, " is missing"));
      break;
    }
    behind_bytes_.fetch_add(static_cast<int64_t>(values[i].bytes.size()),
                            std::memory_order_relaxed);
    absl::StatusOr<absl::string_view> payload =
        DecodePart(values[i].bytes, rows.hash, p.index, p.ref);
    if (!payload.ok()) {
      st = payload.status();
      break;
    }
    if (rows.parts.size() == 1) {
      kv = *payload;
    } else {
      assembled.append(payload->data(), payload->size());
      kv = assembled;
    }
  }
  if (st.ok() && kv.size() != rows.kv_bytes) {
    st = absl::DataLossError(
        absl::StrCat("remote block ", rows.hash.ToHex(), ": KV stream of another size"));
  }
  std::vector<int32_t> claimed = rows.ClaimAll();
  if (!st.ok()) {
    spdlog::warn("remote: KV of an attached block lost: {}", st.ToString());
    MarkLost(rows);
    rows.Abandon(claimed, st, /*lost=*/true);
    return;
  }
  for (int32_t c : claimed) {
    const std::byte* bytes =
        reinterpret_cast<const std::byte*>(kv.data()) + ClusterKvOffset(seg, c);
    CopyClusterRows(seg, c, bytes, rows.key_base(), rows.value_base());
  }
  rows.Publish(claimed);
  behind_segments_.fetch_add(1, std::memory_order_relaxed);
}

KvFetchStats KvFetcher::stats() const {
  KvFetchStats s;
  s.on_demand_bytes = on_demand_bytes_.load(std::memory_order_relaxed);
  s.on_demand_ranges = on_demand_ranges_.load(std::memory_order_relaxed);
  s.on_demand_clusters = on_demand_clusters_.load(std::memory_order_relaxed);
  s.behind_bytes = behind_bytes_.load(std::memory_order_relaxed);
  s.behind_segments = behind_segments_.load(std::memory_order_relaxed);
  s.lost_segments = lost_segments_.load(std::memory_order_relaxed);
  s.unavailable = unavailable_.load(std::memory_order_relaxed);
  absl::MutexLock lock(&mu_);
  s.queued = static_cast<int64_t>(queue_.size());
  return s;
}

}  // namespace kvwave::remote
