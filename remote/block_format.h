// How a shared-prefix block is laid out in the Redis Cluster.
//
// Keys (the block's chain hash is the hash tag, so every key of a block lives in one slot, on
// one node; the namespace is in clear so that Redis ACL key patterns can fence tenants off):
//   kvw:<namespace>:{<hash hex>}:m      the manifest, written LAST
//   kvw:<namespace>:{<hash hex>}:<g>:<i> part i of the write with generation g (random per
//                                       write, so writers racing on one block never mix their
//                                       parts: the manifest names one complete set)
// <namespace> keeps [A-Za-z0-9_.-] and writes any other byte as %XX.
//
// A block = two streams per (layer, KV head) segment (remote/split_segment.h), in
// [layer * kv_heads + kv_head] order: stream 2s is segment s's index (meta index, permutation,
// steady rows, cluster checksums), stream 2s + 1 its key/value rows, cluster by cluster. Each
// stream's bytes are cut into parts of at most max_value_bytes (a part never spans two streams),
// so a reader can fetch the indexes alone and the rows later, or ranges of them (GETRANGE).
// (Format version 1 stored one stream per segment, the persistence codec's; version 2 readers
// skip it as a version mismatch.) Below, "segment" in a part or manifest field means stream.
//
// Part value (format version 2, little-endian):
//   magic "KVWP" u32, version u32, block hash (16), part index u32, segment u32,
//   offset in the segment's encoding u64, payload length u64            (48-byte header)
//   payload
//   XXH3-64 of header + payload u64
// Manifest value:
//   magic "KVWM" u32, version u32, block hash (16), generation u64, record length u32, the encoded
//   BlockRecord (store/persist_format.h: namespace, model id, shape, first position, token ids,
//   parent), segment count u32, per segment its encoded size u64, part count u32, per part (segment
//   u32, offset u64, length u64, XXH3-64 of the part's value u64), XXH3-64 of everything before it
//   u64
// A reader checks magic and version first (a different version is never parsed further), then
// sizes and checksums, then the record against the block it asked for, then each part against
// the manifest; any mismatch is an error, never a served block.
//
// Thread-safety: stateless functions, safe from any thread.
#ifndef KVWAVE_REMOTE_BLOCK_FORMAT_H_
#define KVWAVE_REMOTE_BLOCK_FORMAT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "store/persist_format.h"
#include "store/prefix_hash.h"

namespace kvwave::remote {

inline constexpr uint32_t kRemoteFormatVersion = 2;
inline constexpr size_t kPartHeaderBytes = 48;
inline constexpr size_t kPartOverheadBytes = kPartHeaderBytes + 8;

std::string EscapeNamespace(absl::string_view name_space);
std::string ManifestKey(absl::string_view name_space, const store::BlockHash& hash);
std::string PartKey(absl::string_view name_space, const store::BlockHash& hash, uint64_t generation,
                    uint32_t part);
// The slot of every key of the block.
int BlockSlot(const store::BlockHash& hash);

struct PartRef {
  uint32_t segment = 0;
  uint64_t offset = 0;    // in the segment's encoding
  uint64_t length = 0;    // payload bytes
  uint64_t checksum = 0;  // XXH3-64 of the part's header + payload (its trailer)
  bool operator==(const PartRef&) const = default;
};

struct Manifest {
  store::BlockRecord record;
  uint64_t generation = 0;              // of the parts' keys
  std::vector<uint64_t> segment_bytes;  // encoded size of each segment
  std::vector<PartRef> parts;
  bool operator==(const Manifest&) const = default;
};

// A part value; fills ref (segment, offset, length, checksum).
std::string EncodePart(const store::BlockHash& hash, uint32_t part, uint32_t segment,
                       uint64_t offset, absl::string_view payload, PartRef* ref);
// Checks a part value against the manifest's entry and returns its payload (a view into
// `value`). DataLoss on a size, checksum or identity mismatch; FailedPrecondition (message
// "format version") on another format version.
[[nodiscard]] absl::StatusOr<absl::string_view> DecodePart(absl::string_view value,
                                                           const store::BlockHash& hash,
                                                           uint32_t part, const PartRef& ref);

std::string EncodeManifest(const Manifest& manifest);
// DataLoss on a size or checksum mismatch or an inconsistent part list; FailedPrecondition
// ("format version") on another format version.
[[nodiscard]] absl::StatusOr<Manifest> DecodeManifest(absl::string_view value);

// Whether an error from DecodePart/DecodeManifest is a version mismatch.
bool IsVersionMismatch(const absl::Status& status);

// Test hook: rewrites the version field of a manifest or part value and reseals its checksum.
void TEST_SetVersion(std::string& value, uint32_t version);

}  // namespace kvwave::remote

#endif  // KVWAVE_REMOTE_BLOCK_FORMAT_H_
