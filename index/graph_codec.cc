#include "index/graph_codec.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvwave::index {
namespace {

constexpr char kMagic[4] = {'K', 'V', 'W', 'G'};
constexpr size_t kChecksumBytes = sizeof(uint64_t);

struct Header {
  char magic[4];
  uint32_t version;
  int64_t n;
  int32_t d;
  int32_t entries;
  int32_t search_entries;
  int32_t zero;
  int64_t edges;
  int64_t connect_edges;
};
static_assert(sizeof(Header) == 48, "the header is 48 bytes with no padding");

uint64_t Checksum(const char* data, size_t n) { return XXH3_64bits(data, n); }

// Bytes of the body after the header, or -1 when the counts are implausible (negative, or so
// large the sum would overflow).
int64_t BodyBytes(const Header& h) {
  constexpr int64_t kMax = int64_t{1} << 40;
  if (h.n < 1 || h.n > std::numeric_limits<int32_t>::max() || h.d < 1 || h.entries < 1 ||
      h.search_entries < h.entries || h.edges < 0 || h.edges > kMax) {
    return -1;
  }
  return (h.n + 1) * 8 + (h.edges + h.entries + h.search_entries) * 4;
}

absl::Status Loss(absl::string_view why) {
  return absl::DataLossError(absl::StrCat("graph record: ", why));
}

template <typename T>
void Put(std::string* out, const std::vector<T>& v) {
  out->append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

template <typename T>
std::vector<T> Take(const char** p, int64_t count) {
  std::vector<T> v(static_cast<size_t>(count));
  if (count > 0) std::memcpy(v.data(), *p, v.size() * sizeof(T));
  *p += v.size() * sizeof(T);
  return v;
}

}  // namespace

std::string EncodeGraph(const GraphParts& parts) {
  Header h{};
  std::memcpy(h.magic, kMagic, 4);
  h.version = kGraphCodecVersion;
  h.n = parts.n;
  h.d = parts.d;
  h.entries = static_cast<int32_t>(parts.entries.size());
  h.search_entries = static_cast<int32_t>(parts.search_entries.size());
  h.edges = static_cast<int64_t>(parts.targets.size());
  h.connect_edges = parts.connect_edges;
  std::string out;
  out.reserve(sizeof(Header) + static_cast<size_t>(std::max<int64_t>(BodyBytes(h), 0)) +
              kChecksumBytes);
  out.append(reinterpret_cast<const char*>(&h), sizeof(h));
  Put(&out, parts.offsets);
  Put(&out, parts.targets);
  Put(&out, parts.entries);
  Put(&out, parts.search_entries);
  const uint64_t sum = Checksum(out.data(), out.size());
  out.append(reinterpret_cast<const char*>(&sum), sizeof(sum));
  return out;
}

absl::StatusOr<GraphParts> DecodeGraph(absl::string_view encoded) {
  if (encoded.size() < sizeof(Header) + kChecksumBytes) return Loss("too short");
  Header h;
  std::memcpy(&h, encoded.data(), sizeof(h));
  if (std::memcmp(h.magic, kMagic, 4) != 0) return Loss("bad magic");
  if (h.version != kGraphCodecVersion) return Loss(absl::StrCat("version ", h.version));
  const int64_t body = BodyBytes(h);
  if (body < 0 || h.zero != 0) return Loss("implausible header");
  if (encoded.size() != sizeof(Header) + static_cast<size_t>(body) + kChecksumBytes) {
    return Loss(absl::StrCat("size ", encoded.size(), " does not match the header"));
  }
  uint64_t stored;
  const size_t covered = encoded.size() - kChecksumBytes;
  std::memcpy(&stored, encoded.data() + covered, sizeof(stored));
  if (stored != Checksum(encoded.data(), covered)) return Loss("checksum mismatch");
  const char* p = encoded.data() + sizeof(Header);
  GraphParts parts;
  parts.n = h.n;
  parts.d = h.d;
  parts.connect_edges = h.connect_edges;
  parts.offsets = Take<int64_t>(&p, h.n + 1);
  parts.targets = Take<int32_t>(&p, h.edges);
  parts.entries = Take<int32_t>(&p, h.entries);
  parts.search_entries = Take<int32_t>(&p, h.search_entries);
  // The invariants GraphIndex::FromParts relies on, checked here too so a bad record is DataLoss.
  if (parts.offsets.front() != 0 || parts.offsets.back() != h.edges) return Loss("bad offsets");
  for (int64_t i = 0; i < h.n; ++i) {
    if (parts.offsets[i + 1] < parts.offsets[i]) return Loss("offsets decrease");
  }
  for (int32_t t : parts.targets) {
    if (t < 0 || t >= h.n) return Loss("edge target out of range");
  }
  std::vector<char> seen(static_cast<size_t>(h.n), 0);
  for (size_t i = 0; i < parts.search_entries.size(); ++i) {
    const int32_t e = parts.search_entries[i];
    if (e < 0 || e >= h.n || seen[e]++) return Loss("bad search entries");
    if (i < parts.entries.size() && parts.entries[i] != e) return Loss("bad entry points");
  }
  if (h.connect_edges < 0 || h.connect_edges > h.edges) return Loss("bad connect edge count");
  return parts;
}

void TEST_ResealGraph(std::string& encoded) {
  if (encoded.size() < kChecksumBytes) return;
  const size_t covered = encoded.size() - kChecksumBytes;
  const uint64_t sum = Checksum(encoded.data(), covered);
  std::memcpy(encoded.data() + covered, &sum, sizeof(sum));
}

}  // namespace kvwave::index
