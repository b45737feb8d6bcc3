// The persistence tier: sealed segments of shared-prefix blocks and their registry records in
// RocksDB (layout in store/persist_format.h), with a checksum verified on every read.
//
// Writing a block: PutSegment for each (layer, KV head), then CommitBlock writes the registry
// record. A block is visible (GetBlock, ForEachBlock, LoadBlock) only once committed; segments of
// a block that never commits (a failed write, a crash) are deleted at the next Open. PutBlock
// does all of it; EnqueueBlock hands it to a background writer with a bounded queue and returns
// at once (it never waits on disk), and Flush waits for that queue.
//
// Durability: kNone writes without the WAL (a crash loses what the memtable held); kAsync writes
// the WAL without syncing and a background thread syncs it every sync_interval_ms; kSync syncs
// the WAL on CommitBlock and DeleteBlock (one fsync per block: it also covers the segments
// written before it), so a committed block survives kill -9 and power loss.
//
// Opening never destroys what it could not read: a directory with data files but no CURRENT is
// refused (RocksDB would start an empty database there and delete them), a database RocksDB
// cannot open is an error naming RocksDB's (nothing is changed), and table or blob files that
// the MANIFEST does not reference are moved to <path>/unreferenced-<time>/ (startup_warning()).
//
// Corruption: a record whose checksum, size or layout does not verify (or that RocksDB reports
// corrupt) is never served: its whole block is deleted, counted (stats().corrupt_records) and
// the read returns DataLoss.
//
// Thread-safety: every method is thread-safe. The destructor drains the write-behind queue,
// syncs per the durability mode and closes the database.
#ifndef KVWAVE_STORE_PERSIST_H_
#define KVWAVE_STORE_PERSIST_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "store/host_memory.h"
#include "store/persist_format.h"
#include "store/prefix_hash.h"
#include "store/segment.h"

namespace rocksdb {
class DB;
class Env;
class WriteBatch;
}  // namespace rocksdb

namespace kvwave::store {

enum class Durability { kNone, kAsync, kSync };
// "none", "async" or "sync" (config key persistence.durability).
[[nodiscard]] absl::StatusOr<Durability> ParseDurability(absl::string_view name);

struct PersistOptions {
  std::string path;  // a directory; created if missing
  Durability durability = Durability::kAsync;
  int64_t sync_interval_ms = 100;  // kAsync: period of the background WAL sync
  bool write_behind = true;        // start the background writer (EnqueueBlock)
  int64_t write_behind_max_bytes = int64_t{256} << 20;  // queued segment bytes
  // Seam for tests (fault injection, e.g. a full disk); null = the default environment. Not
  // owned; must outlive the store.
  rocksdb::Env* env = nullptr;
  // Values of at least this size go to RocksDB blob files (no rewrite by compaction).
  int64_t min_blob_bytes = 64 << 10;
  // A segment's RetrievalAttention graph (Segment::graph(), opaque here): encode_graph gives the
  // record stored beside the segment (with its own checksum), or "" for none; decode_graph
  // verifies one and attaches it to the segment just decoded (charging `budget`): DataLoss for a
  // bad record (the block is then treated as corrupt), ResourceExhausted at the limit. Null: no
  // graphs are written or read.
  std::function<std::string(const Segment&)> encode_graph;
  std::function<absl::Status(Segment&, absl::string_view, MemoryBudget&)> decode_graph;
};

struct PersistStats {
  int64_t segments_written = 0;
  int64_t segment_bytes_written = 0;
  int64_t blocks_committed = 0;
  int64_t segments_read = 0;
  int64_t segment_bytes_read = 0;
  int64_t corrupt_records = 0;  // records found corrupt and deleted
  int64_t orphans_cleaned = 0;  // uncommitted blocks removed at Open
  int64_t write_errors = 0;
  int64_t enqueue_rejected = 0;  // EnqueueBlock calls refused because the queue was full
  int64_t queued_bytes = 0;      // now
};

// Segments of a loaded block, [layer * kv_heads + kv_head].
struct LoadedBlock {
  BlockRecord record;
  std::vector<std::shared_ptr<const Segment>> segments;
};

class PersistStore {
 public:
  using Done = std::function<void(const absl::Status&)>;

  // Opens (creating if missing) and removes uncommitted blocks left by a crash or failed write.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<PersistStore>> Open(PersistOptions options);
  ~PersistStore();
  PersistStore(const PersistStore&) = delete;
  PersistStore& operator=(const PersistStore&) = delete;

  // --- Writes (the caller waits for the disk) ---
  // Writes one segment of a block that is not committed yet.
  [[nodiscard]] absl::Status PutSegment(const BlockHash& hash, int32_t layer, int32_t kv_head,
                                        const Segment& segment);
  // Commits the block. REQUIRES (else FailedPrecondition): every (layer, KV head) of
  // record.shape was written by PutSegment since Open.
  [[nodiscard]] absl::Status CommitBlock(const BlockRecord& record);
  // PutSegment of every segment ([layer * kv_heads + kv_head]) and CommitBlock. OK at once if the
  // block is already committed. On error the block's segments are removed (best effort; what
  // remains is removed at the next Open): nothing is half-registered.
  [[nodiscard]] absl::Status PutBlock(const BlockRecord& record,
                                      std::span<const std::shared_ptr<const Segment>> segments);
  // Deletes a block (record and segments). OK if absent.
  [[nodiscard]] absl::Status DeleteBlock(const BlockHash& hash);

  // --- Write behind (never waits on disk) ---
  // Queues PutBlock; `done` (optional) runs on the writer thread with its status. Errors:
  // ResourceExhausted when the queue holds write_behind_max_bytes already (nothing queued),
  // FailedPrecondition when the store has no writer.
  [[nodiscard]] absl::Status EnqueueBlock(BlockRecord record,
                                          std::vector<std::shared_ptr<const Segment>> segments,
                                          Done done = nullptr);
  // Waits until the queue is empty, then makes every write durable (syncs the WAL; in kNone
  // flushes the memtables). Returns the first write-behind error since the last Flush, if any.
  [[nodiscard]] absl::Status Flush();

  // --- Reads (every record verified) ---
  [[nodiscard]] absl::StatusOr<BlockRecord> GetBlock(const BlockHash& hash);
  [[nodiscard]] absl::StatusOr<std::string> GetEncodedSegment(const BlockHash& hash, int32_t layer,
                                                              int32_t kv_head);
  // Decodes into memory charged to `budget` (ResourceExhausted at its limit).
  [[nodiscard]] absl::StatusOr<std::shared_ptr<const Segment>> GetSegment(const BlockHash& hash,
                                                                          int32_t layer,
                                                                          int32_t kv_head,
                                                                          HostAllocator* allocator,
                                                                          MemoryBudget& budget);
  // The record and every segment of a committed block, checked against each other.
  [[nodiscard]] absl::StatusOr<LoadedBlock> LoadBlock(const BlockHash& hash,
                                                      HostAllocator* allocator,
                                                      MemoryBudget& budget);
  // Calls fn for every committed block (startup). Corrupt records are deleted and counted, not
  // passed on. Returns how many were dropped.
  [[nodiscard]] absl::StatusOr<int64_t> ForEachBlock(
      absl::FunctionRef<void(const BlockRecord&)> fn);

  PersistStats stats() const;
  const PersistOptions& options() const { return options_; }
  // What Open had to do to protect the store, for the log (empty when nothing): table or blob
  // files its MANIFEST did not reference were moved aside rather than deleted.
  const std::string& startup_warning() const { return startup_warning_; }
  // Test hook: the raw database (to damage records on purpose).
  rocksdb::DB* TEST_db() { return db_.get(); }

 private:
  struct Job {
    BlockRecord record;
    std::vector<std::shared_ptr<const Segment>> segments;
    Done done;
    int64_t bytes = 0;
  };
  explicit PersistStore(PersistOptions options);  // in the .cc: rocksdb::DB is incomplete here
  absl::Status CleanOrphans();
  // `graph`: the segment's encoded graph, or empty for none (written in the same batch).
  absl::Status PutEncoded(const BlockHash& hash, int32_t layer, int32_t kv_head,
                          absl::string_view encoded, absl::string_view graph = {});
  // The segment's graph record, if any, decoded onto the just-decoded (still private) segment.
  absl::Status LoadGraph(const BlockHash& hash, int32_t layer, int32_t kv_head, Segment& segment,
                         MemoryBudget& budget);
  absl::Status Write(rocksdb::WriteBatch& batch, bool sync, absl::string_view what);
  absl::Status DropBlock(const BlockHash& hash, bool corrupt);
  absl::StatusOr<bool> Exists(const std::string& key);
  void WriterLoop();
  void SyncLoop();
  bool WriterHasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); }
  bool WriterIdle() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return queue_.empty() && !busy_; }

  const PersistOptions options_;
  std::string startup_warning_;
  std::unique_ptr<rocksdb::DB> db_;

  mutable absl::Mutex mu_;
  // Blocks with segments written since Open but not committed: the (layer, kv head) pairs.
  absl::flat_hash_map<BlockHash, absl::flat_hash_set<uint64_t>> pending_ ABSL_GUARDED_BY(mu_);
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  int64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool busy_ ABSL_GUARDED_BY(mu_) = false;  // the writer runs a job
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status behind_error_ ABSL_GUARDED_BY(mu_);  // first write-behind error since Flush
  std::thread writer_, syncer_;

  // Counters: relaxed, they order nothing.
  std::atomic<int64_t> segments_written_{0}, segment_bytes_written_{0}, blocks_committed_{0},
      segments_read_{0}, segment_bytes_read_{0}, corrupt_records_{0}, orphans_cleaned_{0},
      write_errors_{0}, enqueue_rejected_{0};
  // Set after a failed write: the next write first asks RocksDB to resume (acquire/release so
  // the flag and the failure it follows are seen together).
  std::atomic<bool> needs_resume_{false};
};

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_PERSIST_H_
