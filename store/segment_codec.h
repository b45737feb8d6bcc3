// Byte encoding of a sealed Segment, for the persistence tier.
//
// Format (version 2, little-endian):
//   header (48 bytes): magic "KVWS", version u32, first_position i64, num_tokens i32,
//                      steady_tokens i32, head_dim i32, page_tokens i32, num_clusters i32,
//                      dtype u8 + 3 zero bytes, num_rows i64
//   keys   [rows x head_dim] dtype        values [rows x head_dim] dtype
//   centroids [C x d] f32   sizes [C] i32   value_sums [C x d] f32   key_spreads [C] f32
//   token_of_row [rows] i32
//   XXH3-64 of every byte before it (u64)
// Decoding checks the checksum first, then every size and the whole layout (Segment::FromParts);
// any mismatch is DataLoss, whatever the bytes are.
// Version 1 (no key_spreads) is still decoded: its spreads are computed from the rows.
//
// Thread-safety: stateless functions, safe from any thread.
#ifndef KVWAVE_STORE_SEGMENT_CODEC_H_
#define KVWAVE_STORE_SEGMENT_CODEC_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "store/host_memory.h"
#include "store/segment.h"

namespace kvwave::store {

inline constexpr uint32_t kSegmentCodecVersion = 2;

// Size of EncodeSegment's result.
size_t EncodedSegmentSize(const Segment& segment);

// Encodes the whole segment (meta, rows, meta index, permutation) with a checksum.
std::string EncodeSegment(const Segment& segment);
// Same, replacing the contents of *out (reuses its capacity).
void EncodeSegmentTo(const Segment& segment, std::string* out);

// Bytes the decoded segment will charge, read from the header alone (the checksum is not checked
// here). DataLoss when the header is short or implausible.
[[nodiscard]] absl::StatusOr<int64_t> DecodedSegmentBytes(absl::string_view encoded);

// Checks the header, the size and the checksum without decoding (DataLoss on a mismatch).
[[nodiscard]] absl::Status VerifySegmentRecord(absl::string_view encoded);

// Decodes and verifies. Takes the segment's charge out of `reserved` (which must hold at least
// DecodedSegmentBytes). Errors: DataLoss on any mismatch (checksum, version, sizes, layout);
// ResourceExhausted when the allocator fails; InternalError when `reserved` is too small.
[[nodiscard]] absl::StatusOr<std::shared_ptr<const Segment>> DecodeSegment(
    absl::string_view encoded, HostAllocator* allocator, MemoryCharge& reserved);

// Same, reserving the charge from `budget` itself (ResourceExhausted at the limit).
[[nodiscard]] absl::StatusOr<std::shared_ptr<const Segment>> DecodeSegment(
    absl::string_view encoded, HostAllocator* allocator, MemoryBudget& budget);

// Test hook: recomputes the trailing checksum after a test edited the body on purpose.
void TEST_ResealSegment(std::string& encoded);

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_SEGMENT_CODEC_H_
