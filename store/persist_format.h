// The on-disk layout of the persistence tier (RocksDB keys and the block registry record) and the
// one conversion of rocksdb::Status into absl::Status.
//
// Keys (one key space, a one-byte tag first; integers big-endian so keys sort by block, then
// layer, then KV head):
//   'S' hash(16) layer(u32) kv_head(u32) -> an encoded segment (store/segment_codec.h)
//   'S' hash(16) layer(u32) kv_head(u32) 'g' -> the segment's graph, when it has one (encoded
//                                           by PersistOptions::encode_graph, checksummed by it;
//                                           inside the block's segment key range)
//   'R' hash(16)                         -> an encoded BlockRecord (below)
//   'P' hash(16)                         -> empty: segments of this block are written but the
//                                           block is not committed yet (cleaned at startup)
//
// Thread-safety: stateless functions, safe from any thread.
#ifndef KVWAVE_STORE_PERSIST_FORMAT_H_
#define KVWAVE_STORE_PERSIST_FORMAT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "store/model_shape.h"
#include "store/prefix_hash.h"

namespace rocksdb {
class Status;
}  // namespace rocksdb

namespace kvwave::store {

// A committed block of a shared prefix: what its hash names, so a restart can rebuild the
// in-memory registry and a reload can check what it reads.
struct BlockRecord {
  BlockHash hash;
  BlockHash parent;  // the previous block's hash; zero for block 0
  ModelShape shape;
  std::string name_space;
  std::string model_id;
  int64_t first_position = 0;   // position of the block's first token
  std::vector<int32_t> tokens;  // the block's token ids

  int64_t segments() const { return int64_t{shape.layers} * shape.kv_heads; }
  bool operator==(const BlockRecord&) const = default;
};

inline constexpr char kSegmentTag = 'S';
inline constexpr char kRecordTag = 'R';
inline constexpr char kPendingTag = 'P';
inline constexpr size_t kHashKeyBytes = 17;     // tag + hash
inline constexpr size_t kSegmentKeyBytes = 25;  // tag + hash + layer + kv head

std::string SegmentKey(const BlockHash& hash, int32_t layer, int32_t kv_head);
std::string GraphKey(const BlockHash& hash, int32_t layer, int32_t kv_head);
std::string RecordKey(const BlockHash& hash);
std::string PendingKey(const BlockHash& hash);
// Exclusive upper bound of every segment key of `hash`.
std::string SegmentKeyEnd(const BlockHash& hash);
// The hash of a 'R' / 'P' / 'S' key (InvalidArgument when the key is too short).
absl::StatusOr<BlockHash> HashOfKey(absl::string_view key);

// Record bytes: version u32, fields, XXH3-64 of everything before it.
std::string EncodeBlockRecord(const BlockRecord& record);
// DataLoss on a checksum, version or size mismatch.
[[nodiscard]] absl::StatusOr<BlockRecord> DecodeBlockRecord(absl::string_view bytes);

// The one conversion of RocksDB's status: NotFound, DataLoss (corruption), ResourceExhausted
// (no space), Unavailable (I/O, busy), InvalidArgument, Unimplemented, Aborted, Internal.
absl::Status FromRocksDb(const rocksdb::Status& status, absl::string_view what);

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_PERSIST_FORMAT_H_
