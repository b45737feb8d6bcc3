// A sealed segment as the remote tier stores it: two byte streams, so that a reader can attach
// the index first and fetch the key/value rows of single clusters later (remote/kv_fetcher.h).
//
//   index stream (little-endian):
//     header (64 bytes): magic "KVWX" u32, version u32, first_position i64, num_tokens i32,
//                        steady_tokens i32, head_dim i32, page_tokens i32, num_clusters i32,
//                        dtype u8 + 3 zero bytes, num_rows i64, kv_bytes u64, 8 zero bytes
//     steady key rows, steady value rows   [steady_rows x head_dim] dtype each (the sinks' pages)
//     centroids [C x d] f32, sizes [C] i32, value_sums [C x d] f32, key_spreads [C] f32,
//     token_of_row [rows] i32
//     cluster checksums [C] u64: XXH3-64 of each cluster's bytes in the KV stream
//   KV stream: for each cluster c in order, its key rows then its value rows
//     (rows [cluster_row(c), cluster_end_row(c)), padding included); cluster c starts at
//     ClusterKvOffset(c) = 2 * (cluster_row(c) - steady_rows) * row_bytes.
// Integrity: each stream is cut into checksummed parts (remote/block_format.h), so whole parts
// verify themselves; a range of the KV stream read alone (GETRANGE) is verified against the
// cluster checksums of the (verified) index.
//
// Thread-safety: stateless functions, safe from any thread.
#ifndef KVWAVE_REMOTE_SPLIT_SEGMENT_H_
#define KVWAVE_REMOTE_SPLIT_SEGMENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "store/host_memory.h"
#include "store/pending_rows.h"
#include "store/segment.h"

namespace kvwave::remote {

// 2: the clusters' key spreads (store::Segment::key_spreads) after the value sums.
inline constexpr uint32_t kSplitSegmentVersion = 2;

// Encodes the index stream, and the KV stream into *kv (replacing its contents).
void EncodeSplitSegment(const store::Segment& segment, std::string* index, std::string* kv);

// Byte range of cluster c in the KV stream.
uint64_t ClusterKvOffset(const store::Segment& segment, int32_t c);
uint64_t ClusterKvBytes(const store::Segment& segment, int32_t c);

struct SplitIndex {
  std::shared_ptr<const store::Segment> segment;
  std::vector<uint64_t> cluster_checksums;  // [C]
  uint64_t kv_bytes = 0;                    // size of the KV stream
};

// The bytes a segment of `num_tokens` tokens decoded from an index stream of `index_bytes` and a
// KV stream of `kv_bytes` charges (Segment::ChargedBytes), known from the streams' sizes alone
// (a manifest's), before either is read: -1 when no well-formed pair of streams has these sizes.
int64_t SplitSegmentChargedBytes(uint64_t index_bytes, uint64_t kv_bytes, int32_t num_tokens);

// Decodes an index stream into a segment charged in full (its rows included) with `reserved`,
// which must hold exactly SplitSegmentChargedBytes of the streams (DataLoss otherwise). With `kv`
// (the whole KV stream) the rows are copied in and the segment is complete; with `pending` (and
// kv empty) its cluster rows are left to be fetched (store/pending_rows.h; `make_pending` is
// called with the per-cluster "no rows" flags and must return the object). DataLoss on any
// inconsistency; `reserved` is released on any error.
[[nodiscard]] absl::StatusOr<SplitIndex> DecodeSplitSegment(
    absl::string_view index, absl::string_view kv,
    const std::function<std::shared_ptr<store::PendingRows>(const std::vector<bool>&)>&
        make_pending,
    store::HostAllocator* allocator, store::MemoryCharge reserved);

// Copies cluster c's KV-stream bytes (`bytes`, exactly ClusterKvBytes long) into the segment's
// row buffers at `keys`, `values` (the pending rows' bases).
void CopyClusterRows(const store::Segment& segment, int32_t c, const std::byte* bytes,
                     std::byte* keys, std::byte* values);

uint64_t KvChecksum(const void* data, size_t bytes);

}  // namespace kvwave::remote

#endif  // KVWAVE_REMOTE_SPLIT_SEGMENT_H_
