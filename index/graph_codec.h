// Byte encoding of a built graph (GraphParts, index/graph_index.h), for the persistence tier: a
// graph is stored beside its segment and reloaded with it; its keys are the segment's and are
// not part of the record.
//
// Format (version 1, little-endian):
//   header (48 bytes): magic "KVWG", version u32, n i64, d i32, entries i32,
//                      search_entries i32, zero i32, edges i64, connect_edges i64
//   offsets [n + 1] i64   targets [edges] i32   entries [entries] i32
//   search_entries [search_entries] i32
//   XXH3-64 of every byte before it (u64)
// Decoding checks the size and the checksum first, then every invariant (GraphIndex::FromParts
// checks them again against the keys); any mismatch is DataLoss, whatever the bytes are.
//
// Thread-safety: stateless functions, safe from any thread.
#ifndef KVWAVE_INDEX_GRAPH_CODEC_H_
#define KVWAVE_INDEX_GRAPH_CODEC_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "index/graph_index.h"

namespace kvwave::index {

inline constexpr uint32_t kGraphCodecVersion = 1;

std::string EncodeGraph(const GraphParts& parts);

// Errors: DataLoss on any mismatch (magic, version, size, checksum, an invariant of GraphParts).
[[nodiscard]] absl::StatusOr<GraphParts> DecodeGraph(absl::string_view encoded);

// Test hook: recomputes the trailing checksum after a test edited the body on purpose.
void TEST_ResealGraph(std::string& encoded);

}  // namespace kvwave::index

#endif  // KVWAVE_INDEX_GRAPH_CODEC_H_
