#include "store/persist_format.h"

#include <rocksdb/status.h>
#include <xxhash.h>

#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"

namespace kvwave::store {
namespace {

static_assert(std::endian::native == std::endian::little, "records are stored little-endian");
constexpr uint32_t kRecordVersion = 1;
constexpr uint32_t kMaxRecordString = 1 << 16;
constexpr uint32_t kMaxRecordTokens = 1 << 26;

void PutBigEndian(std::string& out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string HashKey(char tag, const BlockHash& hash) {
  std::string key;
  key.reserve(kSegmentKeyBytes);
  key.push_back(tag);
  PutBigEndian(key, hash.high, 8);
  PutBigEndian(key, hash.low, 8);
  return key;
}

template <typename T>
void Append(std::string& out, const T& v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void AppendString(std::string& out, absl::string_view s) {
  Append(out, static_cast<uint32_t>(s.size()));
  out.append(s.data(), s.size());
}

// Bounds-checked reads from a record; every read fails once one has.
class Reader {
 public:
  explicit Reader(absl::string_view in) : in_(in) {}
  template <typename T>
  bool Read(T& v) {
    return Bytes(&v, sizeof(T));
  }
  bool Bytes(void* dst, size_t n) {
    if (!ok_ || in_.size() < n) return ok_ = false;
    if (n > 0) std::memcpy(dst, in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  bool String(std::string& s) {
    uint32_t n = 0;
    if (!Read(n) || n > kMaxRecordString || n > in_.size()) return ok_ = false;
    s.assign(in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  bool ok() const { return ok_; }
  size_t left() const { return in_.size(); }

 private:
  absl::string_view in_;
  bool ok_ = true;
};

}  // namespace

std::string SegmentKey(const BlockHash& hash, int32_t layer, int32_t kv_head) {
  std::string key = HashKey(kSegmentTag, hash);
  PutBigEndian(key, static_cast<uint32_t>(layer), 4);
  PutBigEndian(key, static_cast<uint32_t>(kv_head), 4);
  return key;
}
std::string GraphKey(const BlockHash& hash, int32_t layer, int32_t kv_head) {
  std::string key = SegmentKey(hash, layer, kv_head);
  key.push_back('g');
  return key;
}

std::string RecordKey(const BlockHash& hash) { return HashKey(kRecordTag, hash); }
std::string PendingKey(const BlockHash& hash) { return HashKey(kPendingTag, hash); }
std::string SegmentKeyEnd(const BlockHash& hash) {
  std::string key = HashKey(kSegmentTag, hash);
  key.append(9, '\xff');  // sorts after every 8-byte (layer, kv head) suffix
  return key;
}

absl::StatusOr<BlockHash> HashOfKey(absl::string_view key) {
  if (key.size() < kHashKeyBytes) return absl::InvalidArgumentError("key too short");
  BlockHash h;
  for (int i = 1; i <= 8; ++i) h.high = (h.high << 8) | static_cast<uint8_t>(key[i]);
  for (int i = 9; i <= 16; ++i) h.low = (h.low << 8) | static_cast<uint8_t>(key[i]);
  return h;
}

std::string EncodeBlockRecord(const BlockRecord& r) {
  std::string out;
  out.reserve(128 + r.name_space.size() + r.model_id.size() + 4 * r.tokens.size());
  Append(out, kRecordVersion);
  Append(out, r.hash);
  Append(out, r.parent);
  Append(out, r.shape.layers);
  Append(out, r.shape.q_heads);
  Append(out, r.shape.kv_heads);
  Append(out, r.shape.head_dim);
  Append(out, static_cast<uint8_t>(r.shape.dtype));
  AppendString(out, r.name_space);
  AppendString(out, r.model_id);
  Append(out, r.first_position);
  Append(out, static_cast<uint32_t>(r.tokens.size()));
  out.append(reinterpret_cast<const char*>(r.tokens.data()), r.tokens.size() * 4);
  Append(out, static_cast<uint64_t>(XXH3_64bits(out.data(), out.size())));
  return out;
}

absl::StatusOr<BlockRecord> DecodeBlockRecord(absl::string_view bytes) {
  if (bytes.size() < 8) return absl::DataLossError("block record: truncated");
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
  bytes.remove_suffix(8);
  if (stored != XXH3_64bits(bytes.data(), bytes.size())) {
    return absl::DataLossError("block record: checksum mismatch");
  }
  Reader in(bytes);
  BlockRecord r;
  uint32_t version = 0, tokens = 0;
  uint8_t dtype = 0;
  in.Read(version) && in.Read(r.hash) && in.Read(r.parent) && in.Read(r.shape.layers) &&
      in.Read(r.shape.q_heads) && in.Read(r.shape.kv_heads) && in.Read(r.shape.head_dim) &&
      in.Read(dtype) && in.String(r.name_space) && in.String(r.model_id) &&
      in.Read(r.first_position) && in.Read(tokens);
  if (!in.ok() || version != kRecordVersion || dtype > 2 || tokens > kMaxRecordTokens ||
      in.left() != size_t{tokens} * 4) {
    return absl::DataLossError("block record: bad version or sizes");
  }
  r.shape.dtype = static_cast<DType>(dtype);
  r.tokens.resize(tokens);
  in.Bytes(r.tokens.data(), size_t{tokens} * 4);
  if (!Validate(r.shape).ok()) return absl::DataLossError("block record: bad model shape");
  return r;
}

absl::Status FromRocksDb(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  std::string message = absl::StrCat("rocksdb ", what, ": ", s.ToString());
  switch (s.code()) {
    case rocksdb::Status::kNotFound:
      return absl::NotFoundError(message);
    case rocksdb::Status::kCorruption:
      return absl::DataLossError(message);
    case rocksdb::Status::kInvalidArgument:
      return absl::InvalidArgumentError(message);
    case rocksdb::Status::kNotSupported:
      return absl::UnimplementedError(message);
    case rocksdb::Status::kAborted:
      return absl::AbortedError(message);
    case rocksdb::Status::kIOError:
      if (s.IsNoSpace()) return absl::ResourceExhaustedError(message);
      return absl::UnavailableError(message);
    case rocksdb::Status::kBusy:
    case rocksdb::Status::kTimedOut:
    case rocksdb::Status::kTryAgain:
    case rocksdb::Status::kIncomplete:
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace kvwave::store
