#include "remote/remote_tier.h"

#include <algorithm>
#include <limits>
#include <map>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "remote/block_format.h"
#include "remote/split_segment.h"
#include "spdlog/spdlog.h"

namespace kvwave::remote {
namespace {

int64_t SegmentBytes(const store::BlockSegments& segments) {
  int64_t bytes = 0;
  for (const auto& s : segments) bytes += s->bytes();
  return bytes;
}

// What the block of manifest `m` charges once decoded (its rows included), from the manifest's
// stream sizes alone. DataLoss when they cannot be a block of `expected`.
absl::StatusOr<int64_t> BlockChargedBytes(const store::BlockRecord& expected, const Manifest& m) {
  if (static_cast<int64_t>(m.segment_bytes.size()) != 2 * expected.segments()) {
    return absl::DataLossError(absl::StrCat("remote block ", expected.hash.ToHex(), ": ",
                                            m.segment_bytes.size() / 2, " segments, the shape has ",
                                            expected.segments()));
  }
  const int32_t tokens = static_cast<int32_t>(expected.tokens.size());
  int64_t total = 0;
  for (size_t s = 0; s < m.segment_bytes.size(); s += 2) {
    const int64_t bytes =
        SplitSegmentChargedBytes(m.segment_bytes[s], m.segment_bytes[s + 1], tokens);
    if (bytes < 0 || total > std::numeric_limits<int64_t>::max() / 2 - bytes) {
      return absl::DataLossError(absl::StrCat("remote block ", expected.hash.ToHex(), ": segment ",
                                              s / 2, " has implausible stream sizes"));
    }
    total += bytes;
  }
  return total;
}

uint64_t FreshGeneration() {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return rng();
}

}  // namespace

absl::StatusOr<std::unique_ptr<RemoteTier>> RemoteTier::Create(RemoteTierOptions options) {
  if (options.max_value_bytes < static_cast<int64_t>(kPartOverheadBytes) + 1024) {
    return absl::InvalidArgumentError("remote: max value bytes too small");
  }
  std::unique_ptr<RemoteTier> tier(new RemoteTier(std::move(options)));
  KVWAVE_ASSIGN_OR_RETURN(tier->cluster_, RedisCluster::Create(tier->options_.cluster));
  KvFetcherOptions fetch;
  fetch.threads = std::max(0, tier->options_.fetch_threads);
  fetch.behind_chunk_bytes = tier->options_.fetch_chunk_bytes;
  fetch.behind_quiet_ms = tier->options_.fetch_quiet_ms;
  tier->fetcher_ = std::make_shared<KvFetcher>(tier->cluster_, fetch);
  if (tier->options_.write) tier->writer_ = std::thread([t = tier.get()] { t->WriterLoop(); });
  return tier;
}

RemoteTier::~RemoteTier() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (writer_.joinable()) writer_.join();
  fetcher_->Stop();  // segments still pending keep the fetcher (on-demand fetches) alive
}

// --- Writes ---

bool RemoteTier::Enqueue(store::BlockRecord record, store::BlockSegments segments) {
  const int64_t bytes = SegmentBytes(segments);
  absl::MutexLock lock(&mu_);
  if (!options_.write || stop_ ||
      (queued_bytes_ > 0 && queued_bytes_ + bytes > options_.queue_max_bytes)) {
    queue_dropped_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  queued_bytes_ += bytes;
  queue_.push_back(Job{std::move(record), std::move(segments), bytes});
  return true;
}

absl::Status RemoteTier::Flush() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](RemoteTier* t)
           ABSL_EXCLUSIVE_LOCKS_REQUIRED(t->mu_) { return t->queue_.empty() && !t->busy_; },
      this));
  return std::exchange(write_error_, absl::OkStatus());
}

void RemoteTier::WriterLoop() {
  for (;;) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](RemoteTier* t)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(t->mu_) { return t->stop_ || !t->queue_.empty(); },
          this));
      if (queue_.empty()) return;  // stopping, and drained
      job = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    absl::Status s = WriteBlock(job.record, job.segments);
    job.segments.clear();  // release the pins on the segments before reporting idle
    absl::MutexLock lock(&mu_);
    busy_ = false;
    queued_bytes_ -= job.bytes;
    if (!s.ok()) {
      write_errors_.fetch_add(1, std::memory_order_relaxed);
      if (write_error_.ok()) write_error_ = s;
      spdlog::warn("remote: block {} not written: {}", job.record.hash.ToHex(), s.ToString());
    }
  }
}

absl::Status RemoteTier::WriteParts(int slot, std::vector<std::string>& keys,
                                    std::vector<std::string>& values) {
  if (keys.empty()) return absl::OkStatus();
  std::vector<Command> cmds;
  cmds.reserve(keys.size());
  int64_t bytes = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    cmds.push_back({"SET", keys[i], values[i]});
    bytes += static_cast<int64_t>(values[i].size());
  }
  const int64_t n = static_cast<int64_t>(keys.size());
  KVWAVE_ASSIGN_OR_RETURN(std::vector<Reply> replies, cluster_->Pipeline(slot, cmds, [this, n] {
    parts_sent_.fetch_add(n, std::memory_order_relaxed);
  }));
  for (const Reply& r : replies) {
    if (r.is_error() || r.str() != "OK") {
      // e.g. OOM (maxmemory with a no-eviction policy), or a node that lost its slots.
      return absl::UnavailableError(absl::StrCat("remote: part write refused: ", r.str()));
    }
  }
  bytes_written_.fetch_add(bytes, std::memory_order_relaxed);
  keys.clear();
  values.clear();
  return absl::OkStatus();
}

absl::Status RemoteTier::WriteBlock(const store::BlockRecord& record,
                                    const store::BlockSegments& segments) {
  if (static_cast<int64_t>(segments.size()) != record.segments()) {
    return absl::InvalidArgumentError("remote: segment count does not match the block's shape");
  }
  const int slot = BlockSlot(record.hash);
  Manifest manifest;
  manifest.record = record;
  manifest.generation = FreshGeneration();
  const uint64_t max_payload = static_cast<uint64_t>(options_.max_value_bytes) - kPartOverheadBytes;
  std::vector<std::string> keys, values;
  int64_t window = 0;
  std::string streams[2];
  uint32_t part = 0;
  for (uint32_t s = 0; s < 2 * segments.size(); ++s) {
    if (s % 2 == 0) EncodeSplitSegment(*segments[s / 2], &streams[0], &streams[1]);
    const std::string& encoded = streams[s % 2];
    manifest.segment_bytes.push_back(encoded.size());
    for (uint64_t off = 0; off < encoded.size(); off += max_payload, ++part) {
      const absl::string_view chunk = absl::string_view(encoded).substr(
          off, std::min<uint64_t>(max_payload, encoded.size() - off));
      PartRef ref;
      values.push_back(EncodePart(record.hash, part, s, off, chunk, &ref));
      keys.push_back(PartKey(record.name_space, record.hash, manifest.generation, part));
      manifest.parts.push_back(ref);
      window += static_cast<int64_t>(values.back().size());
      if (window >= options_.write_window_bytes) {
        KVWAVE_RETURN_IF_ERROR(WriteParts(slot, keys, values));
        window = 0;
      }
    }
  }
  KVWAVE_RETURN_IF_ERROR(WriteParts(slot, keys, values));
  // Every part is acknowledged: now the block becomes visible.
  const std::string value = EncodeManifest(manifest);
  const std::string key = ManifestKey(record.name_space, record.hash);
  KVWAVE_ASSIGN_OR_RETURN(Reply r, cluster_->Run({"SET", key, value}));
  if (r.is_error() || r.str() != "OK") {
    return absl::UnavailableError(absl::StrCat("remote: manifest write refused: ", r.str()));
  }
  bytes_written_.fetch_add(static_cast<int64_t>(value.size()), std::memory_order_relaxed);
  blocks_written_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

// --- Reads ---

void RemoteTier::CountFailure(const absl::Status& s) {
  if (IsVersionMismatch(s)) {
    blocks_version_mismatch_.fetch_add(1, std::memory_order_relaxed);
  } else if (absl::IsNotFound(s)) {
    blocks_partial_.fetch_add(1, std::memory_order_relaxed);
  } else if (absl::IsDataLoss(s)) {
    blocks_corrupt_.fetch_add(1, std::memory_order_relaxed);
  } else if (absl::IsUnavailable(s)) {
    unavailable_.fetch_add(1, std::memory_order_relaxed);
  }
  if (!absl::IsResourceExhausted(s)) spdlog::warn("remote: block skipped: {}", s.ToString());
}

absl::Status RemoteTier::CheckKvParts(const store::BlockRecord& expected, const Manifest& m) {
  std::vector<std::string> keys;
  std::vector<uint64_t> lengths;
  for (uint32_t p = 0; p < m.parts.size(); ++p) {
    if (m.parts[p].segment % 2 == 0) continue;
    keys.push_back(PartKey(expected.name_space, expected.hash, m.generation, p));
    lengths.push_back(kPartOverheadBytes + m.parts[p].length);
  }
  std::vector<Command> cmds;
  for (const std::string& k : keys) cmds.push_back({"STRLEN", k});
  KVWAVE_ASSIGN_OR_RETURN(std::vector<Reply> replies,
                          cluster_->Pipeline(BlockSlot(expected.hash), cmds));
  for (size_t i = 0; i < replies.size(); ++i) {
    if (replies[i].is_error()) {
      return absl::UnavailableError(absl::StrCat("remote: ", replies[i].str()));
    }
    if (!replies[i].is_integer() || replies[i].integer() == 0) {
      return absl::NotFoundError(
          absl::StrCat("remote block ", expected.hash.ToHex(), ": a KV part is missing"));
    }
    if (static_cast<uint64_t>(replies[i].integer()) != lengths[i]) {
      return absl::DataLossError(
          absl::StrCat("remote block ", expected.hash.ToHex(), ": a KV part is truncated"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Manifest> RemoteTier::CheckManifest(const store::BlockRecord& expected,
                                                   absl::string_view manifest_value) {
  KVWAVE_ASSIGN_OR_RETURN(Manifest m, DecodeManifest(manifest_value));
  if (m.record != expected) {
    return absl::DataLossError(
        absl::StrCat("remote block ", expected.hash.ToHex(), ": not the prefix asked for"));
  }
  if (fetcher_->IsLost(expected.hash, m.generation)) {
    return absl::DataLossError(absl::StrCat("remote block ", expected.hash.ToHex(),
                                            ": its KV was found gone or corrupt before"));
  }
  return m;
}

absl::StatusOr<store::BlockSegments> RemoteTier::ReadBlock(const store::BlockRecord& expected,
                                                           const Manifest& m, bool lazy,
                                                           store::HostAllocator* allocator,
                                                           store::MemoryCharge& reserved,
                                                           std::vector<BulkValue>& values) {
  if (lazy) KVWAVE_RETURN_IF_ERROR(CheckKvParts(expected, m));
  const int slot = BlockSlot(expected.hash);
  const size_t segments = m.segment_bytes.size() / 2;
  // parts_of[stream]: the stream's part numbers, in offset order.
  std::vector<std::vector<uint32_t>> parts_of(m.segment_bytes.size());
  for (uint32_t p = 0; p < m.parts.size(); ++p) parts_of[m.parts[p].segment].push_back(p);
  store::BlockSegments out(segments);
  std::string assembled[2];
  for (size_t s0 = 0; s0 < segments;) {
    // A window of whole segments, about write_window_bytes of parts.
    size_t s1 = s0;
    uint64_t window = 0;
    while (s1 < segments &&
           (s1 == s0 || window < static_cast<uint64_t>(options_.write_window_bytes))) {
      window += m.segment_bytes[2 * s1] + (lazy ? 0 : m.segment_bytes[2 * s1 + 1]);
      ++s1;
    }
    std::vector<std::string> keys;
    std::vector<size_t> slot_of_part(m.parts.size(), 0);
    for (size_t st = 2 * s0; st < 2 * s1; ++st) {
      if (lazy && st % 2 == 1) continue;
      for (uint32_t p : parts_of[st]) {
        slot_of_part[p] = keys.size();
        keys.push_back(PartKey(expected.name_space, expected.hash, m.generation, p));
      }
    }
    KVWAVE_RETURN_IF_ERROR(cluster_->GetMany(slot, keys, values));
    // The bytes of stream `st` (verified part by part).
    auto stream = [&](size_t st) -> absl::StatusOr<absl::string_view> {
      std::string& buf = assembled[st % 2];
      buf.clear();
      absl::string_view one;
      for (uint32_t p : parts_of[st]) {
        const BulkValue& v = values[slot_of_part[p]];
        if (v.nil) {
          return absl::NotFoundError(
              absl::StrCat("remote block ", expected.hash.ToHex(), ": part ", p, " is missing"));
        }
        bytes_read_.fetch_add(static_cast<int64_t>(v.bytes.size()), std::memory_order_relaxed);
        KVWAVE_ASSIGN_OR_RETURN(one, DecodePart(v.bytes, expected.hash, p, m.parts[p]));
        if (parts_of[st].size() > 1) buf.append(one.data(), one.size());
      }
      return parts_of[st].size() > 1 ? absl::string_view(buf) : one;
    };
    for (size_t s = s0; s < s1; ++s) {
      KVWAVE_ASSIGN_OR_RETURN(absl::string_view index, stream(2 * s));
      absl::string_view kv;
      if (!lazy) {
        KVWAVE_ASSIGN_OR_RETURN(kv, stream(2 * s + 1));
      }
      std::shared_ptr<RemoteRows> rows;
      std::function<std::shared_ptr<store::PendingRows>(const std::vector<bool>&)> make_pending;
      if (lazy) {
        make_pending = [&](const std::vector<bool>& empty) {
          rows = std::make_shared<RemoteRows>(empty, fetcher_);
          return rows;
        };
      }
      // Exact (BlockChargedBytes summed these), so `reserved` ends empty.
      const int64_t charge =
          SplitSegmentChargedBytes(m.segment_bytes[2 * s], m.segment_bytes[2 * s + 1],
                                   static_cast<int32_t>(expected.tokens.size()));
      KVWAVE_CHECK(charge >= 0 && charge <= reserved.bytes());
      KVWAVE_ASSIGN_OR_RETURN(
          SplitIndex split,
          DecodeSplitSegment(index, kv, make_pending, allocator, reserved.Split(charge)));
      out[s] = std::move(split.segment);
      if (rows != nullptr) {
        // Where the rows are; set before the segment is published to any other thread.
        rows->name_space = expected.name_space;
        rows->hash = expected.hash;
        rows->generation = m.generation;
        rows->slot = slot;
        for (uint32_t p : parts_of[2 * s + 1]) rows->parts.push_back({p, m.parts[p]});
        rows->cluster_checksums = std::move(split.cluster_checksums);
        rows->kv_bytes = split.kv_bytes;
        if (rows->kv_bytes != m.segment_bytes[2 * s + 1]) {
          return absl::DataLossError(absl::StrCat("remote block ", expected.hash.ToHex(),
                                                  ": KV stream size does not match its index"));
        }
      }
      if (out[s]->first_position() != expected.first_position ||
          out[s]->num_tokens() != static_cast<int32_t>(expected.tokens.size()) ||
          out[s]->head_dim() != expected.shape.head_dim) {
        return absl::DataLossError(absl::StrCat("remote block ", expected.hash.ToHex(),
                                                ": segment ", s, " does not fit the block"));
      }
    }
    s0 = s1;
  }
  return out;
}

std::vector<store::BlockSegments> RemoteTier::FetchRun(std::span<const store::BlockRecord> expected,
                                                       store::HostAllocator* allocator,
                                                       store::MemoryBudget& budget, bool lazy) {
  lookups_.fetch_add(1, std::memory_order_relaxed);
  std::vector<store::BlockSegments> out;
  if (expected.empty()) return out;
  const KvFetcher::UrgentScope urgent = fetcher_->Urgent();  // the background waits
  // 1. Manifests of every wanted block, one pipeline per node, nodes in parallel.
  std::vector<std::string> keys;
  for (const store::BlockRecord& r : expected) keys.push_back(ManifestKey(r.name_space, r.hash));
  std::vector<Command> cmds;
  for (const std::string& k : keys) cmds.push_back({"GET", k});
  std::vector<absl::StatusOr<Reply>> manifests = cluster_->RunMany(cmds);
  size_t run = 0;
  for (; run < manifests.size(); ++run) {
    const absl::StatusOr<Reply>& r = manifests[run];
    if (!r.ok() || (r->is_error())) {
      unavailable_.fetch_add(1, std::memory_order_relaxed);
      break;
    }
    if (r->is_nil() || !r->is_string()) break;  // not there (never written, or evicted)
  }
  // 2. Each block's whole charge (known from its manifest), reserved in chain order before any
  //    block is read: the run ends at the first block that does not fit, having charged every
  //    block before it, whichever node answers first below.
  std::vector<Manifest> decoded;
  std::vector<store::MemoryCharge> charges;
  for (size_t i = 0; i < run; ++i) {
    absl::StatusOr<Manifest> m = CheckManifest(expected[i], manifests[i]->str());
    absl::StatusOr<int64_t> bytes = m.ok() ? BlockChargedBytes(expected[i], *m) : m.status();
    if (!bytes.ok()) {
      CountFailure(bytes.status());
      run = i;
      break;
    }
    absl::StatusOr<store::MemoryCharge> charge = budget.Reserve(*bytes);
    if (!charge.ok()) {  // the memory limit: this block and the rest are prefilled
      run = i;
      break;
    }
    decoded.push_back(*std::move(m));
    charges.push_back(*std::move(charge));
  }
  if (run == 0) return out;
  // 3. The run's blocks: one thread per node, each block one pipeline (windowed), each decoded
  //    into its own reservation (a block that fails releases its own and, with the blocks after
  //    it, theirs on return).
  std::map<std::string, std::vector<size_t>> by_node;
  for (size_t i = 0; i < run; ++i) {
    absl::StatusOr<std::string> node = cluster_->NodeOfSlot(BlockSlot(expected[i].hash));
    if (!node.ok()) {
      run = i;
      break;
    }
    by_node[*node].push_back(i);
  }
  std::vector<absl::StatusOr<store::BlockSegments>> blocks;
  for (size_t i = 0; i < run; ++i) blocks.emplace_back(absl::UnknownError("not read"));
  std::atomic<size_t> first_bad{run};  // blocks past a failed one are not read
  auto read_node = [&](const std::vector<size_t>& indices) {
    std::vector<BulkValue> scratch;
    for (size_t i : indices) {
      if (i >= first_bad.load(std::memory_order_relaxed)) return;
      blocks[i] = ReadBlock(expected[i], decoded[i], lazy, allocator, charges[i], scratch);
      if (!blocks[i].ok()) {
        CountFailure(blocks[i].status());
        size_t bad = first_bad.load(std::memory_order_relaxed);
        while (i < bad && !first_bad.compare_exchange_weak(bad, i, std::memory_order_relaxed)) {
        }
        return;
      }
    }
  };
  if (by_node.size() == 1) {
    read_node(by_node.begin()->second);
  } else {
    std::vector<std::thread> threads;
    for (const auto& [node, indices] : by_node) {
      threads.emplace_back([&read_node, &indices = indices] { read_node(indices); });
    }
    for (std::thread& t : threads) t.join();
  }
  for (size_t i = 0; i < run && blocks[i].ok(); ++i) out.push_back(*std::move(blocks[i]));
  blocks_fetched_.fetch_add(static_cast<int64_t>(out.size()), std::memory_order_relaxed);
  if (lazy) {
    blocks_lazy_.fetch_add(static_cast<int64_t>(out.size()), std::memory_order_relaxed);
    std::vector<std::weak_ptr<const store::Segment>> behind;
    for (const store::BlockSegments& block : out) {
      for (const auto& seg : block) {
        if (!seg->rows_resident()) behind.push_back(seg);
      }
    }
    fetcher_->FetchBehind(std::move(behind));
  }
  return out;
}

RemoteStats RemoteTier::stats() const {
  RemoteStats s;
  s.blocks_written = blocks_written_.load(std::memory_order_relaxed);
  s.bytes_written = bytes_written_.load(std::memory_order_relaxed);
  s.parts_sent = parts_sent_.load(std::memory_order_relaxed);
  s.write_errors = write_errors_.load(std::memory_order_relaxed);
  s.queue_dropped = queue_dropped_.load(std::memory_order_relaxed);
  s.lookups = lookups_.load(std::memory_order_relaxed);
  s.blocks_fetched = blocks_fetched_.load(std::memory_order_relaxed);
  s.bytes_read = bytes_read_.load(std::memory_order_relaxed);
  s.blocks_partial = blocks_partial_.load(std::memory_order_relaxed);
  s.blocks_corrupt = blocks_corrupt_.load(std::memory_order_relaxed);
  s.blocks_version_mismatch = blocks_version_mismatch_.load(std::memory_order_relaxed);
  s.unavailable = unavailable_.load(std::memory_order_relaxed);
  s.blocks_attached_lazily = blocks_lazy_.load(std::memory_order_relaxed);
  s.kv = fetcher_->stats();
  {
    absl::MutexLock lock(&mu_);
    s.queued_bytes = queued_bytes_;
  }
  s.cluster = cluster_->stats();
  return s;
}

}  // namespace kvwave::remote
