// The remote tier: sealed shared-prefix blocks (KV *and* their index) in a Redis Cluster, so a
// block prefilled and indexed on one host attaches on every other host (layout in
// remote/block_format.h).
//
//   write (readwrite mode): Enqueue hands a registered block to a bounded write-behind queue and
//       returns at once (never waits on the network; a full queue drops the block, counted). A
//       worker thread encodes the segments, writes the parts under a fresh generation (pipelined,
//       a window of bytes at a time) and, once every part is acknowledged, the manifest: a block
//       is visible only when it is whole.
//   read: FetchRun GETs the manifests of the wanted blocks (one pipeline per node, nodes in
//       parallel), keeps the longest run that exists and matches what was asked (namespace,
//       model id, shape, positions, token ids, parent), charges each block of it to the memory
//       budget in chain order (the whole block, rows included; its size follows from the
//       manifest's stream sizes) up to the first that does not fit, then reads the charged
//       blocks' parts (one thread per node, each block one pipeline, every block decoded into its
//       own charge), checks every part and segment and decodes them.
//       Lazy (FetchRun's `lazy`): only the index streams are read (and the KV parts' lengths
//       checked with STRLEN); the segments come back with their rows pending, fetched on demand
//       and behind by the KvFetcher (remote/kv_fetcher.h). A FetchRun is an urgent read: the
//       KvFetcher's background reads pause while it runs.
//       The run ends at the first block missing, partial (a part gone: a writer died, or Redis
//       evicted it), corrupt, truncated, of another format version, or unreachable; each kind is
//       counted and nothing of such a block is served.
// A node that is slow or down costs at most the configured timeout once per down_retry_ms
// (remote/redis_cluster.h); meanwhile its blocks are misses and the context prefills them.
//
// Thread-safety: every method is thread-safe. The destructor drains the queue (each write is
// bounded by the timeouts) and joins the worker.
#ifndef KVWAVE_REMOTE_REMOTE_TIER_H_
#define KVWAVE_REMOTE_REMOTE_TIER_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "remote/kv_fetcher.h"
#include "remote/redis_cluster.h"
#include "store/host_memory.h"
#include "store/persist_format.h"
#include "store/prefix_registry.h"

namespace kvwave::remote {

struct RemoteTierOptions {
  RedisClusterOptions cluster;
  bool write = false;                              // readwrite mode: start the writer
  int64_t queue_max_bytes = int64_t{1} << 30;      // queued segment bytes
  int64_t max_value_bytes = int64_t{8} << 20;      // largest value written
  int64_t write_window_bytes = int64_t{32} << 20;  // part bytes in flight per pipeline
  int fetch_threads = 1;                           // background KV fetch workers (lazy reads)
  int64_t fetch_chunk_bytes = int64_t{512} << 10;  // KV bytes per background read
  int64_t fetch_quiet_ms = 20;  // background reads wait this long after the last urgent read
};

struct RemoteStats {
  // Writes.
  int64_t blocks_written = 0;
  int64_t bytes_written = 0;  // part + manifest values
  int64_t parts_sent = 0;     // part values handed to a connection
  int64_t write_errors = 0;
  int64_t queue_dropped = 0;  // Enqueue refused: the queue was full
  int64_t queued_bytes = 0;   // now
  // Reads.
  int64_t lookups = 0;
  int64_t blocks_fetched = 0;
  int64_t bytes_read = 0;
  int64_t blocks_partial = 0;  // manifest present, a part missing
  int64_t blocks_corrupt = 0;  // checksum / size / layout / identity mismatch
  int64_t blocks_version_mismatch = 0;
  int64_t unavailable = 0;             // reads that failed on a slow or dead node
  int64_t blocks_attached_lazily = 0;  // of blocks_fetched: index only, rows pending
  KvFetchStats kv;
  // The cluster.
  RedisClusterStats cluster;
};

class RemoteTier {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<RemoteTier>> Create(
      RemoteTierOptions options);
  ~RemoteTier();
  RemoteTier(const RemoteTier&) = delete;
  RemoteTier& operator=(const RemoteTier&) = delete;

  bool writes() const { return options_.write; }

  // Queues a registered block for writing; never waits. False (dropped, counted) when the queue
  // already holds queue_max_bytes or the tier does not write.
  bool Enqueue(store::BlockRecord record, store::BlockSegments segments);
  // Waits until the queue is empty; returns the first write error since the last Flush.
  [[nodiscard]] absl::Status Flush();

  // The longest run expected[0..n) of blocks present and verified in the cluster, decoded into
  // memory charged to `budget` in full. The run also ends where the budget does: block i is
  // charged before block i + 1 (before either is read), so it ends at the first block that does
  // not fit, whatever the order the nodes answer in. With `lazy`,
  // only the indexes are read: the segments' rows are pending (store/pending_rows.h) and queued
  // for the background fetch.
  std::vector<store::BlockSegments> FetchRun(std::span<const store::BlockRecord> expected,
                                             store::HostAllocator* allocator,
                                             store::MemoryBudget& budget, bool lazy = false);

  KvFetcher& fetcher() { return *fetcher_; }

  RemoteStats stats() const;
  RedisCluster& cluster() { return *cluster_; }

  // Writes one block now (what the worker does). Exposed for tests and tools.
  [[nodiscard]] absl::Status WriteBlock(const store::BlockRecord& record,
                                        const store::BlockSegments& segments);

 private:
  struct Job {
    store::BlockRecord record;
    store::BlockSegments segments;
    int64_t bytes = 0;
  };
  explicit RemoteTier(RemoteTierOptions options) : options_(std::move(options)) {}
  void WriterLoop();
  absl::Status WriteParts(int slot, std::vector<std::string>& keys,
                          std::vector<std::string>& values);
  // Decodes a block's manifest and checks it names `expected` (and a KV not found lost before).
  absl::StatusOr<Manifest> CheckManifest(const store::BlockRecord& expected,
                                         absl::string_view manifest_value);
  // Reads, checks and decodes one block of manifest `m` (checked), its segments charged out of
  // `reserved` (REQUIRES: holds the block's BlockChargedBytes; empty on success).
  // `scratch` holds the part buffers, reused from block to block.
  absl::StatusOr<store::BlockSegments> ReadBlock(const store::BlockRecord& expected,
                                                 const Manifest& m, bool lazy,
                                                 store::HostAllocator* allocator,
                                                 store::MemoryCharge& reserved,
                                                 std::vector<BulkValue>& scratch);
  // The lengths of a lazy block's KV parts, checked with STRLEN (a part evicted since the
  // manifest was written makes the block partial now rather than at the first Attend).
  absl::Status CheckKvParts(const store::BlockRecord& expected, const Manifest& m);
  void CountFailure(const absl::Status& status);

  const RemoteTierOptions options_;
  std::shared_ptr<RedisCluster> cluster_;
  std::shared_ptr<KvFetcher> fetcher_;

  mutable absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  int64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool busy_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status write_error_ ABSL_GUARDED_BY(mu_);  // first since the last Flush
  std::thread writer_;

  // Statistics: relaxed, they order nothing.
  std::atomic<int64_t> blocks_written_{0}, bytes_written_{0}, parts_sent_{0}, write_errors_{0},
      queue_dropped_{0}, lookups_{0}, blocks_fetched_{0}, bytes_read_{0}, blocks_partial_{0},
      blocks_corrupt_{0}, blocks_version_mismatch_{0}, unavailable_{0}, blocks_lazy_{0};
};

}  // namespace kvwave::remote

#endif  // KVWAVE_REMOTE_REMOTE_TIER_H_
