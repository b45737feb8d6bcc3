#include "remote/block_format.h"

#include <xxhash.h>

#include <cctype>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "remote/redis_cluster.h"

namespace kvwave::remote {
namespace {

constexpr uint32_t kPartMagic = 0x5057564b;      // "KVWP"
constexpr uint32_t kManifestMagic = 0x4d57564b;  // "KVWM"
constexpr size_t kManifestFixedBytes = 4 + 4 + 16 + 8 + 4;
constexpr uint64_t kMaxEntries = 1 << 24;  // segments or parts of one block: far above real

template <typename T>
void Put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(v));
}

void PutHash(std::string& out, const store::BlockHash& h) {
  Put(out, h.low);
  Put(out, h.high);
}

// Reads fixed-size fields, failing once past the end.
class Reader {
 public:
  explicit Reader(absl::string_view bytes) : bytes_(bytes) {}
  template <typename T>
  bool Get(T* v) {
    if (bytes_.size() - at_ < sizeof(T)) return false;
    std::memcpy(v, bytes_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return true;
  }
  bool GetHash(store::BlockHash* h) { return Get(&h->low) && Get(&h->high); }
  bool GetBytes(size_t n, absl::string_view* out) {
    if (bytes_.size() - at_ < n) return false;
    *out = bytes_.substr(at_, n);
    at_ += n;
    return true;
  }
  size_t at() const { return at_; }

 private:
  absl::string_view bytes_;
  size_t at_ = 0;
};

uint64_t Checksum(absl::string_view bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

absl::Status VersionError(uint32_t version) {
  return absl::FailedPreconditionError(absl::StrCat("remote block: format version ", version,
                                                    ", this build reads ", kRemoteFormatVersion));
}

// Magic and version, checked before anything else.
absl::Status CheckHead(absl::string_view value, uint32_t magic, const char* what) {
  Reader r(value);
  uint32_t m = 0, version = 0;
  if (!r.Get(&m) || !r.Get(&version)) {
    return absl::DataLossError(
        absl::StrCat("remote ", what, ": truncated (", value.size(), " bytes)"));
  }
  if (m != magic) return absl::DataLossError(absl::StrCat("remote ", what, ": bad magic"));
  if (version != kRemoteFormatVersion) return VersionError(version);
  return absl::OkStatus();
}

absl::Status CheckTrailer(absl::string_view value, const char* what) {
  uint64_t stored;
  std::memcpy(&stored, value.data() + value.size() - 8, 8);
  if (stored != Checksum(value.substr(0, value.size() - 8))) {
    return absl::DataLossError(absl::StrCat("remote ", what, ": checksum mismatch"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string EscapeNamespace(absl::string_view name_space) {
  std::string out;
  for (unsigned char c : name_space) {
    if (std::isalnum(c) || c == '_' || c == '.' || c == '-') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppend(&out, "%", absl::Hex(c, absl::kZeroPad2));
    }
  }
  return out;
}

std::string ManifestKey(absl::string_view name_space, const store::BlockHash& hash) {
  return absl::StrCat("kvw:", EscapeNamespace(name_space), ":{", hash.ToHex(), "}:m");
}

std::string PartKey(absl::string_view name_space, const store::BlockHash& hash, uint64_t generation,
                    uint32_t part) {
  return absl::StrCat("kvw:", EscapeNamespace(name_space), ":{", hash.ToHex(),
                      "}:", absl::Hex(generation), ":", part);
}

int BlockSlot(const store::BlockHash& hash) { return KeySlot(hash.ToHex()); }

std::string EncodePart(const store::BlockHash& hash, uint32_t part, uint32_t segment,
                       uint64_t offset, absl::string_view payload, PartRef* ref) {
  std::string out;
  out.reserve(kPartOverheadBytes + payload.size());
  Put(out, kPartMagic);
  Put(out, kRemoteFormatVersion);
  PutHash(out, hash);
  Put(out, part);
  Put(out, segment);
  Put(out, offset);
  Put(out, static_cast<uint64_t>(payload.size()));
  out.append(payload.data(), payload.size());
  const uint64_t sum = Checksum(out);
  Put(out, sum);
  *ref = PartRef{segment, offset, payload.size(), sum};
  return out;
}

absl::StatusOr<absl::string_view> DecodePart(absl::string_view value, const store::BlockHash& hash,
                                             uint32_t part, const PartRef& ref) {
  KVWAVE_RETURN_IF_ERROR(CheckHead(value, kPartMagic, "part"));
  if (value.size() != kPartOverheadBytes + ref.length) {
    return absl::DataLossError(absl::StrCat("remote part ", part, ": ", value.size(),
                                            " bytes, the manifest says ",
                                            kPartOverheadBytes + ref.length));
  }
  // One pass: the checksum of header + payload must be both the value's own trailer and the
  // manifest's record of the part.
  const uint64_t sum = Checksum(value.substr(0, value.size() - 8));
  uint64_t trailer;
  std::memcpy(&trailer, value.data() + value.size() - 8, 8);
  if (sum != trailer) {
    return absl::DataLossError(absl::StrCat("remote part ", part, ": checksum mismatch"));
  }
  if (sum != ref.checksum) {
    return absl::DataLossError(absl::StrCat("remote part ", part, ": not the manifest's part"));
  }
  Reader r(value.substr(8));
  store::BlockHash h;
  uint32_t index = 0, segment = 0;
  uint64_t offset = 0, length = 0;
  r.GetHash(&h);
  r.Get(&index);
  r.Get(&segment);
  r.Get(&offset);
  r.Get(&length);
  if (h != hash || index != part || segment != ref.segment || offset != ref.offset ||
      length != ref.length) {
    return absl::DataLossError(absl::StrCat("remote part ", part, ": identity mismatch"));
  }
  return value.substr(kPartHeaderBytes, length);
}

std::string EncodeManifest(const Manifest& m) {
  const std::string record = store::EncodeBlockRecord(m.record);
  std::string out;
  Put(out, kManifestMagic);
  Put(out, kRemoteFormatVersion);
  PutHash(out, m.record.hash);
  Put(out, m.generation);
  Put(out, static_cast<uint32_t>(record.size()));
  out.append(record.data(), record.size());
  Put(out, static_cast<uint32_t>(m.segment_bytes.size()));
  for (uint64_t b : m.segment_bytes) Put(out, b);
  Put(out, static_cast<uint32_t>(m.parts.size()));
  for (const PartRef& p : m.parts) {
    Put(out, p.segment);
    Put(out, p.offset);
    Put(out, p.length);
    Put(out, p.checksum);
  }
  const uint64_t sum = Checksum(out);
  Put(out, sum);
  return out;
}

absl::StatusOr<Manifest> DecodeManifest(absl::string_view value) {
  KVWAVE_RETURN_IF_ERROR(CheckHead(value, kManifestMagic, "manifest"));
  auto truncated = [] { return absl::DataLossError("remote manifest: truncated"); };
  if (value.size() < kManifestFixedBytes + 8) return truncated();
  KVWAVE_RETURN_IF_ERROR(CheckTrailer(value, "manifest"));
  Reader r(value.substr(8, value.size() - 16));
  Manifest m;
  store::BlockHash hash;
  uint32_t record_len = 0, segments = 0, parts = 0;
  absl::string_view record;
  if (!r.GetHash(&hash) || !r.Get(&m.generation) || !r.Get(&record_len) ||
      !r.GetBytes(record_len, &record)) {
    return truncated();
  }
  KVWAVE_ASSIGN_OR_RETURN(m.record, store::DecodeBlockRecord(record));
  if (m.record.hash != hash) return absl::DataLossError("remote manifest: hash mismatch");
  if (!r.Get(&segments) || segments > kMaxEntries ||
      static_cast<int64_t>(segments) != 2 * m.record.segments()) {
    return absl::DataLossError("remote manifest: stream count does not match the shape");
  }
  m.segment_bytes.resize(segments);
  for (uint64_t& b : m.segment_bytes) {
    if (!r.Get(&b)) return truncated();
  }
  if (!r.Get(&parts) || parts > kMaxEntries) return truncated();
  m.parts.resize(parts);
  // Parts must tile every segment's bytes in order, with no gap and no overlap.
  std::vector<uint64_t> covered(segments, 0);
  for (PartRef& p : m.parts) {
    if (!r.Get(&p.segment) || !r.Get(&p.offset) || !r.Get(&p.length) || !r.Get(&p.checksum)) {
      return truncated();
    }
    if (p.segment >= segments || p.offset != covered[p.segment] || p.length == 0 ||
        p.length > m.segment_bytes[p.segment] - covered[p.segment]) {
      return absl::DataLossError("remote manifest: parts do not tile the segments");
    }
    covered[p.segment] += p.length;
  }
  for (uint32_t s = 0; s < segments; ++s) {
    if (covered[s] != m.segment_bytes[s]) {
      return absl::DataLossError("remote manifest: a segment is not covered by its parts");
    }
  }
  if (r.at() != value.size() - 16) return absl::DataLossError("remote manifest: trailing bytes");
  return m;
}

bool IsVersionMismatch(const absl::Status& status) {
  return absl::IsFailedPrecondition(status) &&
         absl::StrContains(status.message(), "format version");
}

void TEST_SetVersion(std::string& value, uint32_t version) {
  if (value.size() < 16) return;
  std::memcpy(value.data() + 4, &version, 4);
  const uint64_t sum = Checksum(absl::string_view(value).substr(0, value.size() - 8));
  std::memcpy(value.data() + value.size() - 8, &sum, 8);
}

}  // namespace kvwave::remote
