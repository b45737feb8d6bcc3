#include "store/prefix_hash.h"

#include <xxhash.h>

#include <bit>

#include "absl/strings/str_format.h"
#include "config/status_macros.h"

namespace kvwave::store {
namespace {

static_assert(std::endian::native == std::endian::little, "token bytes are hashed as stored");

// RAII owner of an XXH3 streaming state.
class Xxh3State {
 public:
  Xxh3State() : state_(XXH3_createState()) {
    KVWAVE_CHECK(state_ != nullptr);
    KVWAVE_CHECK(XXH3_128bits_reset(state_) == XXH_OK);
  }
  ~Xxh3State() { XXH3_freeState(state_); }
  Xxh3State(const Xxh3State&) = delete;
  Xxh3State& operator=(const Xxh3State&) = delete;

  void Add(const void* data, size_t n) { XXH3_128bits_update(state_, data, n); }
  void AddLength(uint64_t n) { Add(&n, sizeof(n)); }
  void AddString(absl::string_view s) {
    AddLength(s.size());
    Add(s.data(), s.size());
  }
  BlockHash Digest() const {
    XXH128_hash_t h = XXH3_128bits_digest(state_);
    return BlockHash{h.low64, h.high64};
  }

 private:
  XXH3_state_t* state_;
};

}  // namespace

std::string BlockHash::ToHex() const { return absl::StrFormat("%016x%016x", high, low); }

BlockHash ChainBlockHash(const BlockHash& previous, absl::string_view name_space,
                         absl::string_view model_id, std::span<const int32_t> block_tokens) {
  Xxh3State state;
  state.Add(&previous.low, sizeof(previous.low));
  state.Add(&previous.high, sizeof(previous.high));
  state.AddString(name_space);
  state.AddString(model_id);
  state.AddLength(block_tokens.size());
  state.Add(block_tokens.data(), block_tokens.size_bytes());
  return state.Digest();
}

std::vector<BlockHash> PrefixBlockHashes(std::span<const int32_t> tokens, int64_t block_tokens,
                                         absl::string_view name_space, absl::string_view model_id) {
  KVWAVE_CHECK(block_tokens >= 1);
  const int64_t blocks = static_cast<int64_t>(tokens.size()) / block_tokens;
  std::vector<BlockHash> hashes;
  hashes.reserve(blocks);
  BlockHash previous;
  for (int64_t i = 0; i < blocks; ++i) {
    previous = ChainBlockHash(previous, name_space, model_id,
                              tokens.subspan(i * block_tokens, block_tokens));
    hashes.push_back(previous);
  }
  return hashes;
}

}  // namespace kvwave::store
