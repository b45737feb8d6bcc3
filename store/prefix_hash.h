// Chain hashes of segment-aligned token blocks, the keys of shared prefixes.
//
//   h_0 = XXH3-128(zero, namespace, model id, tokens of block 0)
//   h_i = XXH3-128(h_{i-1}, namespace, model id, tokens of block i)
// Block i holds tokens [i * block_tokens, (i + 1) * block_tokens). Strings and the token list
// are length-prefixed, so no two different inputs share a byte stream. Because of the chain, a
// block's hash names the whole prefix up to its end: two contexts that diverge at block i share
// hashes of blocks < i only.
//
// The model id must name everything that shapes a sealed segment (model, shape, dtype, and the
// segment / page / cluster / sink settings), so that a cached segment is only shared by
// contexts that would have built the same one.
//
// Thread-safety: stateless functions, safe from any thread.
#ifndef KVWAVE_STORE_PREFIX_HASH_H_
#define KVWAVE_STORE_PREFIX_HASH_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace kvwave::store {

struct BlockHash {
  uint64_t low = 0;
  uint64_t high = 0;

  bool operator==(const BlockHash&) const = default;
  bool operator<(const BlockHash& o) const { return high != o.high ? high < o.high : low < o.low; }
  std::string ToHex() const;  // 32 hex digits, high first

  template <typename H>
  friend H AbslHashValue(H h, const BlockHash& b) {
    return H::combine(std::move(h), b.low, b.high);
  }
};

// One link of the chain: the hash of a block given its predecessor's (zero for block 0).
BlockHash ChainBlockHash(const BlockHash& previous, absl::string_view name_space,
                         absl::string_view model_id, std::span<const int32_t> block_tokens);

// Hashes of every full block of `tokens` (a trailing partial block has none), in order.
// REQUIRES: block_tokens >= 1.
std::vector<BlockHash> PrefixBlockHashes(std::span<const int32_t> tokens, int64_t block_tokens,
                                         absl::string_view name_space, absl::string_view model_id);

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_PREFIX_HASH_H_
