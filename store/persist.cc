#include "store/persist.h"

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/listener.h>
#include <rocksdb/metadata.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "store/segment_codec.h"
#include "tbb/parallel_for.h"

namespace kvwave::store {
namespace {

uint64_t PairKey(int32_t layer, int32_t kv_head) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(layer)) << 32) |
         static_cast<uint32_t>(kv_head);
}

// RocksDB would retry a no-space error by itself every few seconds (and refuse Resume meanwhile);
// the store resumes on its next write instead, so a freed disk is usable at once.
class ManualRecovery final : public rocksdb::EventListener {
 public:
  const char* Name() const override { return "kvwave-manual-recovery"; }
  void OnErrorRecoveryBegin(rocksdb::BackgroundErrorReason, rocksdb::Status,
                            bool* auto_recovery) override {
    *auto_recovery = false;
  }
};

rocksdb::Options DbOptions(const PersistOptions& o) {
  rocksdb::Options options;
  options.create_if_missing = true;
  options.env = o.env != nullptr ? o.env : rocksdb::Env::Default();
  options.compression = rocksdb::kNoCompression;  // K/V floats barely compress
  options.max_background_jobs = 2;
  // Segments are megabytes: keep them in blob files so compaction never rewrites them.
  options.enable_blob_files = true;
  options.min_blob_size = static_cast<uint64_t>(o.min_blob_bytes);
  options.enable_blob_garbage_collection = true;
  options.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  options.listeners.push_back(std::make_shared<ManualRecovery>());
  return options;
}

// Segment reads: the codec's own XXH3 checksum covers every byte, so RocksDB's block / blob
// checksum pass is skipped, and the multi-megabyte values stay out of the block cache.
rocksdb::ReadOptions SegmentReadOptions() {
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;
  ro.fill_cache = false;
  return ro;
}

// The number of a RocksDB table (NNNNNN.sst), blob (.blob) or WAL (.log) file with extension
// `ext`, or -1 when `name` is not one.
int64_t NumberedFile(const std::string& name, absl::string_view ext) {
  if (name.size() <= ext.size() || !absl::EndsWith(name, ext)) return -1;
  const size_t digits = name.size() - ext.size();
  if (digits > 18) return -1;
  int64_t n = 0;
  for (size_t i = 0; i < digits; ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    n = n * 10 + (name[i] - '0');
  }
  return n;
}

// True for the names of RocksDB files that hold data: table, blob and WAL files, and MANIFESTs.
bool IsDataFile(const std::string& name) {
  return name.starts_with("MANIFEST-") || NumberedFile(name, ".sst") >= 0 ||
         NumberedFile(name, ".blob") >= 0 || NumberedFile(name, ".log") >= 0;
}

// Refuses a directory that holds RocksDB data files but no CURRENT (the file naming the live
// MANIFEST). RocksDB would take it for a missing database, create a new empty one there and
// delete the old files as obsolete: the cache would be silently wiped. Nothing is touched here.
absl::Status CheckNotOrphaned(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(path, ec) || fs::exists(fs::path(path) / "CURRENT", ec)) {
    return absl::OkStatus();  // missing (created fresh) or a database RocksDB can try to open
  }
  int64_t data_files = 0;
  std::string example, newest_manifest;
  for (const auto& entry : fs::directory_iterator(path, ec)) {
    const std::string name = entry.path().filename().string();
    if (!IsDataFile(name)) continue;
    ++data_files;
    if (example.empty()) example = name;
    if (name.starts_with("MANIFEST-") && name > newest_manifest) newest_manifest = name;
  }
  if (ec) {
    return absl::UnavailableError(absl::StrCat("persist: cannot list ", path, ": ", ec.message()));
  }
  if (data_files == 0) return absl::OkStatus();
  std::string restore =
      newest_manifest.empty()
          ? std::string("no MANIFEST is left, so try `ldb repair --db=") + path + "`"
          : absl::StrCat("if ", newest_manifest, " is intact, `echo ", newest_manifest, " > ", path,
                         "/CURRENT` restores it (else try `ldb repair --db=", path, "`)");
  return absl::FailedPreconditionError(absl::StrCat(
      "persist: ", path, " holds ", data_files, " RocksDB data file(s) (e.g. ", example,
      ") but no CURRENT file; opening it would create an empty database and delete them, so "
      "nothing was opened or changed. To recover the cache: ",
      restore, ". To start with an empty cache instead: move ", path, " aside."));
}

// Adds what to do about the errors RocksDB gives when a store cannot be opened.
absl::Status ExplainOpenError(absl::Status s, const std::string& path) {
  if (s.ok()) return s;
  const absl::string_view m = s.message();
  std::string hint;
  if (m.find("While lock file") != absl::string_view::npos ||
      m.find("/LOCK:") != absl::string_view::npos) {
    hint = "another process (a second kvwaved?) has this persist.path open";
  } else if (absl::IsDataLoss(s)) {
    hint = absl::StrCat("the store is damaged; nothing was changed. Move ", path,
                        " aside to start with an empty cache, or try `ldb repair --db=", path,
                        "` on a copy");
  } else {
    hint = "check that persist.path is a writable directory";
  }
  return absl::Status(s.code(), absl::StrCat(m, " (", hint, ")"));
}

// Table and blob files that the MANIFEST does not reference are deleted by RocksDB when it opens
// a database read-write. After a crash during a flush or compaction that is right (their data is
// still in the WAL or the inputs), but after a damaged (e.g. truncated) MANIFEST it would delete
// the whole cache. So before that open, with the store's LOCK held (no writer can be active),
// the database is opened read-only (which changes no data file), and every unreferenced table or
// blob file is moved into <path>/unreferenced-<UTC time>/ together with a copy of the MANIFESTs
// and CURRENT, instead of letting RocksDB delete it. Returns a warning naming what was moved
// (empty when nothing was), or RocksDB's error when even a read-only open fails.
absl::StatusOr<std::string> SetAsideUnreferenced(const PersistOptions& o) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path dir(o.path);
  if (!fs::exists(dir / "CURRENT", ec)) return std::string();  // a new store
  rocksdb::Options options = DbOptions(o);
  options.create_if_missing = false;
  rocksdb::FileLock* lock = nullptr;
  KVWAVE_RETURN_IF_ERROR(ExplainOpenError(
      FromRocksDb(options.env->LockFile((dir / "LOCK").string(), &lock), "open " + o.path),
      o.path));
  absl::flat_hash_set<int64_t> live;
  rocksdb::DB* raw = nullptr;
  absl::Status opened =
      FromRocksDb(rocksdb::DB::OpenForReadOnly(options, o.path, &raw), "open " + o.path);
  if (opened.ok()) {
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::ColumnFamilyMetaData meta;
    db->GetColumnFamilyMetaData(&meta);
    for (const auto& level : meta.levels) {
      for (const auto& f : level.files) live.insert(static_cast<int64_t>(f.file_number));
    }
    for (const auto& b : meta.blob_files) live.insert(static_cast<int64_t>(b.blob_file_number));
    opened = FromRocksDb(db->Close(), "close (read-only) " + o.path);
  }
  std::vector<fs::path> unreferenced;
  if (opened.ok()) {
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      const std::string name = entry.path().filename().string();
      int64_t n = NumberedFile(name, ".sst");
      if (n < 0) n = NumberedFile(name, ".blob");
      if (n >= 0 && !live.contains(n)) unreferenced.push_back(entry.path());
    }
    if (ec)
      opened = absl::UnavailableError(absl::StrCat("persist: list ", o.path, ": ", ec.message()));
  }
  std::string warning;
  if (opened.ok() && !unreferenced.empty()) {
    char stamp[32];
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    std::strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm);
    const fs::path aside = dir / absl::StrCat("unreferenced-", stamp, "-", getpid());
    fs::create_directory(aside, ec);
    int64_t bytes = 0;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      const std::string name = entry.path().filename().string();
      if (name == "CURRENT" || name.starts_with("MANIFEST-")) {
        fs::copy_file(entry.path(), aside / name, ec);
        if (ec) break;
      }
    }
    for (const fs::path& f : unreferenced) {
      if (ec) break;
      bytes += static_cast<int64_t>(fs::file_size(f, ec));
      fs::rename(f, aside / f.filename(), ec);
    }
    if (ec) {
      opened = absl::UnavailableError(absl::StrCat("persist: could not move unreferenced files of ",
                                                   o.path, " to ", aside.string(), ": ",
                                                   ec.message(), "; nothing was deleted"));
    } else {
      warning = absl::StrCat(
          "persist: ", unreferenced.size(), " table/blob file(s) (", bytes, " bytes) in ", o.path,
          " are not referenced by its MANIFEST (a crash during a flush, or a damaged MANIFEST); "
          "moved to ",
          aside.string(),
          " (with a copy of the MANIFEST and CURRENT) instead of letting RocksDB delete them. "
          "If cached blocks are missing, stop kvwaved and try `ldb repair` on a copy; else "
          "delete that directory.");
    }
  }
  options.env->UnlockFile(lock).PermitUncheckedError();
  KVWAVE_RETURN_IF_ERROR(ExplainOpenError(std::move(opened), o.path));
  return warning;
}

}  // namespace

absl::StatusOr<Durability> ParseDurability(absl::string_view name) {
  if (name == "none") return Durability::kNone;
  if (name == "async") return Durability::kAsync;
  if (name == "sync") return Durability::kSync;
  return absl::InvalidArgumentError(
      absl::StrCat("durability must be none, async or sync, not '", std::string(name), "'"));
}

absl::StatusOr<std::unique_ptr<PersistStore>> PersistStore::Open(PersistOptions options) {
  if (options.path.empty()) return absl::InvalidArgumentError("persist: empty path");
  if (options.sync_interval_ms < 1 || options.write_behind_max_bytes < 1) {
    return absl::InvalidArgumentError("persist: bad sync interval or queue size");
  }
  auto store = std::unique_ptr<PersistStore>(new PersistStore(std::move(options)));
  const std::string& path = store->options_.path;
  KVWAVE_RETURN_IF_ERROR(CheckNotOrphaned(path));
  KVWAVE_ASSIGN_OR_RETURN(store->startup_warning_, SetAsideUnreferenced(store->options_));
  rocksdb::DB* db = nullptr;
  KVWAVE_RETURN_IF_ERROR(
      ExplainOpenError(FromRocksDb(rocksdb::DB::Open(DbOptions(store->options_), path, &db),
                                   absl::StrCat("open ", path)),
                       path));
  store->db_.reset(db);
  KVWAVE_RETURN_IF_ERROR(ExplainOpenError(store->CleanOrphans(), path));
  if (store->options_.write_behind) {
    store->writer_ = std::thread([s = store.get()] { s->WriterLoop(); });
  }
  if (store->options_.durability == Durability::kAsync) {
    store->syncer_ = std::thread([s = store.get()] { s->SyncLoop(); });
  }
  return store;
}

PersistStore::PersistStore(PersistOptions options) : options_(std::move(options)) {}

PersistStore::~PersistStore() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;  // the writer drains the queue before it leaves
  }
  if (writer_.joinable()) writer_.join();
  if (syncer_.joinable()) syncer_.join();
  if (db_ != nullptr) {
    // A graceful close flushes the memtables (segments land in blob files), so a restart
    // replays no WAL; then the WAL is synced in case the flush failed.
    db_->Flush(rocksdb::FlushOptions()).PermitUncheckedError();
    if (options_.durability != Durability::kNone) {
      db_->FlushWAL(/*sync=*/true).PermitUncheckedError();
    }
    db_->Close().PermitUncheckedError();
  }
}

// Removes blocks whose segments were written but whose record never was.
absl::Status PersistStore::CleanOrphans() {
  std::vector<BlockHash> pending;
  {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(std::string(1, kPendingTag)); it->Valid() && it->key()[0] == kPendingTag;
         it->Next()) {
      auto hash = HashOfKey(absl::string_view(it->key().data(), it->key().size()));
      if (hash.ok()) pending.push_back(*hash);
    }
    KVWAVE_RETURN_IF_ERROR(FromRocksDb(it->status(), "scan pending blocks"));
  }
  for (const BlockHash& hash : pending) {
    KVWAVE_ASSIGN_OR_RETURN(bool committed, Exists(RecordKey(hash)));
    rocksdb::WriteBatch batch;
    batch.Delete(PendingKey(hash));
    if (!committed) {
      batch.DeleteRange(SegmentKey(hash, 0, 0), SegmentKeyEnd(hash));
      orphans_cleaned_.fetch_add(1, std::memory_order_relaxed);
    }
    KVWAVE_RETURN_IF_ERROR(Write(batch, options_.durability == Durability::kSync, "clean"));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> PersistStore::Exists(const std::string& key) {
  rocksdb::PinnableSlice value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), db_->DefaultColumnFamily(), key, &value);
  if (s.IsNotFound()) return false;
  KVWAVE_RETURN_IF_ERROR(FromRocksDb(s, "get"));
  return true;
}

absl::Status PersistStore::Write(rocksdb::WriteBatch& batch, bool sync, absl::string_view what) {
  if (needs_resume_.exchange(false, std::memory_order_acq_rel)) {
    // After a failed write (e.g. a full disk), RocksDB stops writing until resumed; if the cause
    // is still there the write below fails again and sets the flag again.
    db_->Resume().PermitUncheckedError();
  }
  rocksdb::WriteOptions wo;
  wo.disableWAL = options_.durability == Durability::kNone;
  wo.sync = sync && options_.durability == Durability::kSync;
  absl::Status status = FromRocksDb(db_->Write(wo, &batch), what);
  if (!status.ok()) {
    write_errors_.fetch_add(1, std::memory_order_relaxed);
    needs_resume_.store(true, std::memory_order_release);
  }
  return status;
}

absl::Status PersistStore::PutEncoded(const BlockHash& hash, int32_t layer, int32_t kv_head,
                                      absl::string_view encoded, absl::string_view graph) {
  if (layer < 0 || kv_head < 0) return absl::InvalidArgumentError("persist: negative index");
  bool first;
  {
    absl::MutexLock lock(&mu_);
    first = !pending_.contains(hash);
  }
  rocksdb::WriteBatch batch;
  if (first) batch.Put(PendingKey(hash), rocksdb::Slice());
  batch.Put(SegmentKey(hash, layer, kv_head), rocksdb::Slice(encoded.data(), encoded.size()));
  if (!graph.empty()) {
    batch.Put(GraphKey(hash, layer, kv_head), rocksdb::Slice(graph.data(), graph.size()));
  }
  KVWAVE_RETURN_IF_ERROR(Write(batch, /*sync=*/false, "put segment"));
  {
    absl::MutexLock lock(&mu_);
    pending_[hash].insert(PairKey(layer, kv_head));
  }
  segments_written_.fetch_add(1, std::memory_order_relaxed);
  segment_bytes_written_.fetch_add(static_cast<int64_t>(encoded.size() + graph.size()),
                                   std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status PersistStore::PutSegment(const BlockHash& hash, int32_t layer, int32_t kv_head,
                                      const Segment& segment) {
  const std::string graph = options_.encode_graph != nullptr && segment.graph() != nullptr
                                ? options_.encode_graph(segment)
                                : std::string();
  return PutEncoded(hash, layer, kv_head, EncodeSegment(segment), graph);
}

absl::Status PersistStore::CommitBlock(const BlockRecord& record) {
  KVWAVE_RETURN_IF_ERROR(Validate(record.shape));
  {
    absl::MutexLock lock(&mu_);
    auto it = pending_.find(record.hash);
    bool complete =
        it != pending_.end() && static_cast<int64_t>(it->second.size()) == record.segments();
    for (int32_t l = 0; complete && l < record.shape.layers; ++l) {
      for (int32_t h = 0; complete && h < record.shape.kv_heads; ++h) {
        complete = it->second.contains(PairKey(l, h));
      }
    }
    if (!complete) {
      return absl::FailedPreconditionError(
          absl::StrCat("persist: block ", record.hash.ToHex(), " lacks segments"));
    }
  }
  rocksdb::WriteBatch batch;
  batch.Put(RecordKey(record.hash), EncodeBlockRecord(record));
  batch.Delete(PendingKey(record.hash));
  KVWAVE_RETURN_IF_ERROR(Write(batch, /*sync=*/true, "commit block"));
  {
    absl::MutexLock lock(&mu_);
    pending_.erase(record.hash);
  }
  blocks_committed_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status PersistStore::PutBlock(const BlockRecord& record,
                                    std::span<const std::shared_ptr<const Segment>> segments) {
  KVWAVE_RETURN_IF_ERROR(Validate(record.shape));
  if (static_cast<int64_t>(segments.size()) != record.segments()) {
    return absl::InvalidArgumentError("persist: one segment per layer and KV head is needed");
  }
  KVWAVE_ASSIGN_OR_RETURN(bool committed, Exists(RecordKey(record.hash)));
  if (committed) return absl::OkStatus();
  absl::Status status;
  std::string encoded;
  for (int64_t i = 0; status.ok() && i < record.segments(); ++i) {
    if (segments[i] == nullptr) {
      status = absl::InvalidArgumentError("persist: null segment");
      break;
    }
    EncodeSegmentTo(*segments[i], &encoded);
    const std::string graph = options_.encode_graph != nullptr && segments[i]->graph() != nullptr
                                  ? options_.encode_graph(*segments[i])
                                  : std::string();
    status = PutEncoded(record.hash, static_cast<int32_t>(i / record.shape.kv_heads),
                        static_cast<int32_t>(i % record.shape.kv_heads), encoded, graph);
  }
  if (status.ok()) status = CommitBlock(record);
  if (!status.ok()) DropBlock(record.hash, /*corrupt=*/false).IgnoreError();
  return status;
}

absl::Status PersistStore::DropBlock(const BlockHash& hash, bool corrupt) {
  if (corrupt) corrupt_records_.fetch_add(1, std::memory_order_relaxed);
  {
    absl::MutexLock lock(&mu_);
    pending_.erase(hash);
  }
  rocksdb::WriteBatch batch;
  batch.Delete(RecordKey(hash));
  batch.DeleteRange(SegmentKey(hash, 0, 0), SegmentKeyEnd(hash));
  batch.Delete(PendingKey(hash));
  return Write(batch, /*sync=*/true, "delete block");
}

absl::Status PersistStore::DeleteBlock(const BlockHash& hash) {
  return DropBlock(hash, /*corrupt=*/false);
}

absl::Status PersistStore::EnqueueBlock(BlockRecord record,
                                        std::vector<std::shared_ptr<const Segment>> segments,
                                        Done done) {
  if (!options_.write_behind) return absl::FailedPreconditionError("persist: no writer");
  int64_t bytes = 0;
  for (const auto& s : segments) bytes += s != nullptr ? s->bytes() : 0;
  absl::MutexLock lock(&mu_);
  if (!queue_.empty() && queued_bytes_ + bytes > options_.write_behind_max_bytes) {
    enqueue_rejected_.fetch_add(1, std::memory_order_relaxed);
    return absl::ResourceExhaustedError(
        absl::StrCat("persist: write-behind queue full (", queued_bytes_, " bytes)"));
  }
  queued_bytes_ += bytes;
  queue_.push_back(Job{std::move(record), std::move(segments), std::move(done), bytes});
  return absl::OkStatus();
}

void PersistStore::WriterLoop() {
  for (;;) {
    Job job;
    {
      absl::MutexLock lock(&mu_, absl::Condition(this, &PersistStore::WriterHasWork));
      if (queue_.empty()) return;  // stop_ and drained
      job = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    absl::Status status = PutBlock(job.record, job.segments);
    if (job.done) job.done(status);
    job.segments.clear();  // release the segments before the job counts as written
    absl::MutexLock lock(&mu_);
    if (!status.ok() && behind_error_.ok()) behind_error_ = status;
    queued_bytes_ -= job.bytes;
    busy_ = false;
  }
}

void PersistStore::SyncLoop() {
  const absl::Duration period = absl::Milliseconds(options_.sync_interval_ms);
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stop_), period)) return;
    }
    db_->FlushWAL(/*sync=*/true).PermitUncheckedError();
  }
}

absl::Status PersistStore::Flush() {
  absl::Status behind;
  {
    absl::MutexLock lock(&mu_, absl::Condition(this, &PersistStore::WriterIdle));
    behind = std::exchange(behind_error_, absl::OkStatus());
  }
  absl::Status synced = options_.durability == Durability::kNone
                            ? FromRocksDb(db_->Flush(rocksdb::FlushOptions()), "flush")
                            : FromRocksDb(db_->FlushWAL(/*sync=*/true), "sync wal");
  return behind.ok() ? synced : behind;
}

absl::StatusOr<BlockRecord> PersistStore::GetBlock(const BlockHash& hash) {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), RecordKey(hash), &value);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat("block ", hash.ToHex()));
  absl::StatusOr<BlockRecord> record = s.ok() ? DecodeBlockRecord(value) : FromRocksDb(s, "get");
  if (record.ok() && record->hash != hash) {
    record = absl::DataLossError("block record: stored under another hash");
  }
  if (!record.ok() && record.status().code() == absl::StatusCode::kDataLoss) {
    DropBlock(hash, /*corrupt=*/true).IgnoreError();
  }
  return record;
}

absl::StatusOr<std::string> PersistStore::GetEncodedSegment(const BlockHash& hash, int32_t layer,
                                                            int32_t kv_head) {
  std::string value;
  rocksdb::Status s = db_->Get(SegmentReadOptions(), SegmentKey(hash, layer, kv_head), &value);
  if (s.IsNotFound()) {
    return absl::NotFoundError(
        absl::StrCat("segment ", hash.ToHex(), " layer ", layer, " head ", kv_head));
  }
  absl::Status status = s.ok() ? VerifySegmentRecord(value) : FromRocksDb(s, "get");
  if (status.code() == absl::StatusCode::kDataLoss) DropBlock(hash, true).IgnoreError();
  KVWAVE_RETURN_IF_ERROR(status);
  segments_read_.fetch_add(1, std::memory_order_relaxed);
  segment_bytes_read_.fetch_add(static_cast<int64_t>(value.size()), std::memory_order_relaxed);
  return value;
}

absl::StatusOr<std::shared_ptr<const Segment>> PersistStore::GetSegment(const BlockHash& hash,
                                                                        int32_t layer,
                                                                        int32_t kv_head,
                                                                        HostAllocator* allocator,
                                                                        MemoryBudget& budget) {
  rocksdb::PinnableSlice value;
  rocksdb::Status s = db_->Get(SegmentReadOptions(), db_->DefaultColumnFamily(),
                               SegmentKey(hash, layer, kv_head), &value);
  if (s.IsNotFound()) {
    return absl::NotFoundError(
        absl::StrCat("segment ", hash.ToHex(), " layer ", layer, " head ", kv_head));
  }
  absl::StatusOr<std::shared_ptr<const Segment>> segment =
      s.ok() ? DecodeSegment(absl::string_view(value.data(), value.size()), allocator, budget)
             : FromRocksDb(s, "get");
  if (segment.ok() && options_.decode_graph != nullptr) {
    // Still private to this call: its graph may be attached (Segment::SetGraph).
    absl::Status g =
        LoadGraph(hash, layer, kv_head, *std::const_pointer_cast<Segment>(*segment), budget);
    if (!g.ok()) segment = g;
  }
  if (segment.status().code() == absl::StatusCode::kDataLoss) DropBlock(hash, true).IgnoreError();
  if (segment.ok()) {
    segments_read_.fetch_add(1, std::memory_order_relaxed);
    segment_bytes_read_.fetch_add(static_cast<int64_t>(value.size()), std::memory_order_relaxed);
  }
  return segment;
}

absl::Status PersistStore::LoadGraph(const BlockHash& hash, int32_t layer, int32_t kv_head,
                                     Segment& segment, MemoryBudget& budget) {
  rocksdb::PinnableSlice value;
  rocksdb::Status s = db_->Get(SegmentReadOptions(), db_->DefaultColumnFamily(),
                               GraphKey(hash, layer, kv_head), &value);
  if (s.IsNotFound()) return absl::OkStatus();  // a segment without a graph
  if (!s.ok()) return FromRocksDb(s, "get graph");
  KVWAVE_RETURN_IF_ERROR(
      options_.decode_graph(segment, absl::string_view(value.data(), value.size()), budget));
  segment_bytes_read_.fetch_add(static_cast<int64_t>(value.size()), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<LoadedBlock> PersistStore::LoadBlock(const BlockHash& hash, HostAllocator* allocator,
                                                    MemoryBudget& budget) {
  LoadedBlock block;
  KVWAVE_ASSIGN_OR_RETURN(block.record, GetBlock(hash));
  const BlockRecord& r = block.record;
  block.segments.reserve(r.segments());
  // Segments are read and verified in parallel (each is an independent RocksDB read + decode);
  // the checks below run in order, so the first problem reported is deterministic.
  const int32_t kv_heads = r.shape.kv_heads;
  std::vector<absl::StatusOr<std::shared_ptr<const Segment>>> loaded(
      r.segments(), absl::UnknownError("not loaded"));
  tbb::parallel_for(int64_t{0}, r.segments(), [&](int64_t i) {
    loaded[i] = GetSegment(hash, static_cast<int32_t>(i / kv_heads),
                           static_cast<int32_t>(i % kv_heads), allocator, budget);
  });
  // A corrupt segment has already dropped (and counted) the whole block inside GetSegment; the
  // parallel reads of its other segments may then find them gone: report the corruption, once.
  for (auto& segment : loaded) {
    if (segment.status().code() == absl::StatusCode::kDataLoss) return segment.status();
  }
  for (auto& segment : loaded) {
    if (segment.status().code() == absl::StatusCode::kNotFound) {
      DropBlock(hash, /*corrupt=*/true).IgnoreError();  // committed, yet a segment is missing
      return absl::DataLossError(absl::StrCat("block ", hash.ToHex(), " lacks a segment"));
    }
    KVWAVE_RETURN_IF_ERROR(segment.status());
    const Segment& s = **segment;
    if (s.first_position() != r.first_position ||
        s.num_tokens() != static_cast<int64_t>(r.tokens.size()) ||
        s.head_dim() != r.shape.head_dim || s.dtype() != r.shape.dtype) {
      DropBlock(hash, /*corrupt=*/true).IgnoreError();
      return absl::DataLossError(absl::StrCat("block ", hash.ToHex(), ": segment mismatch"));
    }
    block.segments.push_back(*std::move(segment));
  }
  return block;
}

absl::StatusOr<int64_t> PersistStore::ForEachBlock(absl::FunctionRef<void(const BlockRecord&)> fn) {
  std::vector<BlockHash> corrupt;
  {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(std::string(1, kRecordTag)); it->Valid() && it->key()[0] == kRecordTag;
         it->Next()) {
      auto hash = HashOfKey(absl::string_view(it->key().data(), it->key().size()));
      if (!hash.ok()) continue;
      auto record = DecodeBlockRecord(absl::string_view(it->value().data(), it->value().size()));
      if (record.ok() && record->hash == *hash) {
        fn(*record);
      } else {
        corrupt.push_back(*hash);
      }
    }
    KVWAVE_RETURN_IF_ERROR(FromRocksDb(it->status(), "scan blocks"));
  }
  for (const BlockHash& hash : corrupt) KVWAVE_RETURN_IF_ERROR(DropBlock(hash, /*corrupt=*/true));
  return static_cast<int64_t>(corrupt.size());
}

PersistStats PersistStore::stats() const {
  PersistStats s;
  s.segments_written = segments_written_.load(std::memory_order_relaxed);
  s.segment_bytes_written = segment_bytes_written_.load(std::memory_order_relaxed);
  s.blocks_committed = blocks_committed_.load(std::memory_order_relaxed);
  s.segments_read = segments_read_.load(std::memory_order_relaxed);
  s.segment_bytes_read = segment_bytes_read_.load(std::memory_order_relaxed);
  s.corrupt_records = corrupt_records_.load(std::memory_order_relaxed);
  s.orphans_cleaned = orphans_cleaned_.load(std::memory_order_relaxed);
  s.write_errors = write_errors_.load(std::memory_order_relaxed);
  s.enqueue_rejected = enqueue_rejected_.load(std::memory_order_relaxed);
  absl::MutexLock lock(&mu_);
  s.queued_bytes = queued_bytes_;
  return s;
}

}  // namespace kvwave::store
