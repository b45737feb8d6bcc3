#include "store/segment_codec.h"

#include <xxhash.h>

#include <bit>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"

namespace kvwave::store {
namespace {

static_assert(std::endian::native == std::endian::little, "the codec assumes little-endian");

constexpr uint32_t kMagic = 0x5357564B;  // "KVWS"
constexpr size_t kHeaderBytes = 48;
constexpr size_t kChecksumBytes = 8;
// Plausibility bounds, so that sizes computed from a garbage header never overflow.
constexpr int64_t kMaxTokens = int64_t{1} << 26;
constexpr int64_t kMaxHeadDim = 4096;
constexpr int64_t kMaxPageTokens = int64_t{1} << 20;

struct Header {
  uint32_t magic = kMagic;
  uint32_t version = kSegmentCodecVersion;
  int64_t first_position = 0;
  int32_t num_tokens = 0;
  int32_t steady_tokens = 0;
  int32_t head_dim = 0;
  int32_t page_tokens = 0;
  int32_t num_clusters = 0;
  uint8_t dtype = 0;
  uint8_t pad[3] = {0, 0, 0};
  int64_t num_rows = 0;
};
static_assert(sizeof(Header) == kHeaderBytes);
static_assert(offsetof(Header, num_rows) == 40);

// Byte counts of the body sections, from a header.
struct Body {
  int64_t row_bytes, rows_bytes, cluster_floats_bytes, sizes_bytes, spreads_bytes, tor_bytes, total;
};

Body BodyOf(const Header& h) {
  Body b;
  b.row_bytes =
      int64_t{h.head_dim} * static_cast<int64_t>(ElementSize(static_cast<DType>(h.dtype)));
  b.rows_bytes = h.num_rows * b.row_bytes;
  b.cluster_floats_bytes = int64_t{h.num_clusters} * h.head_dim * 4;
  b.sizes_bytes = int64_t{h.num_clusters} * 4;
  b.spreads_bytes = h.version >= 2 ? int64_t{h.num_clusters} * 4 : 0;  // version 1: none
  b.tor_bytes = h.num_rows * 4;
  b.total = kHeaderBytes + 2 * b.rows_bytes + 2 * b.cluster_floats_bytes + b.sizes_bytes +
            b.spreads_bytes + b.tor_bytes + kChecksumBytes;
  return b;
}

absl::Status DataLoss(absl::string_view what) {
  return absl::DataLossError(absl::StrCat("segment record: ", what));
}

// Reads and bounds-checks the header (no checksum).
absl::StatusOr<Header> ReadHeader(absl::string_view encoded) {
  if (encoded.size() < kHeaderBytes + kChecksumBytes) return DataLoss("truncated header");
  Header h;
  std::memcpy(&h, encoded.data(), kHeaderBytes);
  if (h.magic != kMagic) return DataLoss("bad magic");
  if (h.version != kSegmentCodecVersion && h.version != 1) {
    return DataLoss(absl::StrCat("unsupported version ", h.version));
  }
  if (h.num_tokens < 1 || h.num_tokens > kMaxTokens || h.head_dim < 1 || h.head_dim > kMaxHeadDim ||
      h.page_tokens < 1 || h.page_tokens > kMaxPageTokens || h.num_clusters < 0 ||
      h.num_clusters > h.num_tokens || h.dtype > 2 || h.num_rows < 0 ||
      h.num_rows > 2 * kMaxTokens + int64_t{h.num_clusters + 1} * h.page_tokens) {
    return DataLoss("implausible header");
  }
  return h;
}

class Cursor {
 public:
  explicit Cursor(const char* p) : p_(p) {}
  void Copy(void* dst, int64_t n) {
    if (n > 0) std::memcpy(dst, p_, static_cast<size_t>(n));  // dst may be null when n == 0
    p_ += n;
  }
  template <typename T>
  std::vector<T> Vector(int64_t bytes) {
    std::vector<T> v(static_cast<size_t>(bytes) / sizeof(T));
    Copy(v.data(), bytes);
    return v;
  }

 private:
  const char* p_;
};

uint64_t Checksum(const char* data, size_t n) { return XXH3_64bits(data, n); }

}  // namespace

size_t EncodedSegmentSize(const Segment& s) {
  Header h;
  h.head_dim = s.head_dim();
  h.num_clusters = s.num_clusters();
  h.dtype = static_cast<uint8_t>(s.dtype());
  h.num_rows = s.num_rows();
  return static_cast<size_t>(BodyOf(h).total);
}

void EncodeSegmentTo(const Segment& s, std::string* out) {
  KVWAVE_CHECK(s.rows_resident());  // a remote-attached segment is never re-encoded half-fetched
  Header h;
  h.first_position = s.first_position();
  h.num_tokens = s.num_tokens();
  h.steady_tokens = s.steady_tokens();
  h.head_dim = s.head_dim();
  h.page_tokens = s.page_tokens();
  h.num_clusters = s.num_clusters();
  h.dtype = static_cast<uint8_t>(s.dtype());
  h.num_rows = s.num_rows();
  const Body b = BodyOf(h);
  out->resize(static_cast<size_t>(b.total));
  char* p = out->data();
  auto put = [&p](const void* src, size_t n) {
    if (n > 0) std::memcpy(p, src, n);
    p += n;
  };
  put(&h, kHeaderBytes);
  put(s.key_bytes().data(), b.rows_bytes);
  put(s.value_bytes().data(), b.rows_bytes);
  put(s.centroids().data(), b.cluster_floats_bytes);
  put(s.sizes().data(), b.sizes_bytes);
  put(s.value_sums().data(), b.cluster_floats_bytes);
  put(s.key_spreads().data(), b.spreads_bytes);
  put(s.token_of_rows().data(), b.tor_bytes);
  const uint64_t sum = Checksum(out->data(), out->size() - kChecksumBytes);
  put(&sum, kChecksumBytes);
}

std::string EncodeSegment(const Segment& s) {
  std::string out;
  EncodeSegmentTo(s, &out);
  return out;
}

absl::StatusOr<int64_t> DecodedSegmentBytes(absl::string_view encoded) {
  KVWAVE_ASSIGN_OR_RETURN(Header h, ReadHeader(encoded));
  return Segment::ChargedBytes(h.num_rows, h.num_tokens, h.num_clusters, h.head_dim,
                               static_cast<DType>(h.dtype));
}

namespace {

absl::StatusOr<Header> VerifiedHeader(absl::string_view encoded) {
  KVWAVE_ASSIGN_OR_RETURN(Header h, ReadHeader(encoded));
  const int64_t total = BodyOf(h).total;
  if (static_cast<int64_t>(encoded.size()) != total) {
    return DataLoss(absl::StrCat("size ", encoded.size(), ", header implies ", total));
  }
  uint64_t stored;
  std::memcpy(&stored, encoded.data() + encoded.size() - kChecksumBytes, kChecksumBytes);
  if (stored != Checksum(encoded.data(), encoded.size() - kChecksumBytes)) {
    return DataLoss("checksum mismatch");
  }
  return h;
}

}  // namespace

absl::Status VerifySegmentRecord(absl::string_view encoded) {
  return VerifiedHeader(encoded).status();
}

namespace {

// Decodes bytes whose header, size and checksum VerifiedHeader accepted.
absl::StatusOr<std::shared_ptr<const Segment>> DecodeVerified(absl::string_view encoded,
                                                              const Header& h,
                                                              HostAllocator* allocator,
                                                              MemoryCharge& reserved) {
  const Body b = BodyOf(h);
  SegmentParts parts;
  parts.first_position = h.first_position;
  parts.num_tokens = h.num_tokens;
  parts.steady_tokens = h.steady_tokens;
  parts.head_dim = h.head_dim;
  parts.dtype = static_cast<DType>(h.dtype);
  parts.page_tokens = h.page_tokens;
  parts.num_clusters = h.num_clusters;
  KVWAVE_ASSIGN_OR_RETURN(parts.keys, HostBuffer::Allocate(allocator, b.rows_bytes));
  KVWAVE_ASSIGN_OR_RETURN(parts.values, HostBuffer::Allocate(allocator, b.rows_bytes));
  Cursor in(encoded.data() + kHeaderBytes);
  in.Copy(parts.keys.data(), b.rows_bytes);
  in.Copy(parts.values.data(), b.rows_bytes);
  parts.centroids = in.Vector<float>(b.cluster_floats_bytes);
  parts.sizes = in.Vector<int32_t>(b.sizes_bytes);
  parts.value_sums = in.Vector<float>(b.cluster_floats_bytes);
  // Version 1 has no spreads: FromParts computes them from the rows.
  if (h.version >= 2) parts.key_spreads = in.Vector<float>(b.spreads_bytes);
  parts.token_of_row = in.Vector<int32_t>(b.tor_bytes);
  auto segment = Segment::FromParts(std::move(parts), reserved);
  if (!segment.ok() && segment.status().code() == absl::StatusCode::kInvalidArgument) {
    return DataLoss(segment.status().message());
  }
  return segment;
}

int64_t ChargeOf(const Header& h) {
  return Segment::ChargedBytes(h.num_rows, h.num_tokens, h.num_clusters, h.head_dim,
                               static_cast<DType>(h.dtype));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Segment>> DecodeSegment(absl::string_view encoded,
                                                             HostAllocator* allocator,
                                                             MemoryCharge& reserved) {
  KVWAVE_ASSIGN_OR_RETURN(Header h, VerifiedHeader(encoded));
  return DecodeVerified(encoded, h, allocator, reserved);
}

absl::StatusOr<std::shared_ptr<const Segment>> DecodeSegment(absl::string_view encoded,
                                                             HostAllocator* allocator,
                                                             MemoryBudget& budget) {
  KVWAVE_ASSIGN_OR_RETURN(Header h, VerifiedHeader(encoded));  // before trusting its sizes
  KVWAVE_ASSIGN_OR_RETURN(MemoryCharge reserved, budget.Reserve(ChargeOf(h)));
  return DecodeVerified(encoded, h, allocator, reserved);
}

void TEST_ResealSegment(std::string& encoded) {
  if (encoded.size() < kChecksumBytes) return;
  const uint64_t sum = Checksum(encoded.data(), encoded.size() - kChecksumBytes);
  std::memcpy(encoded.data() + encoded.size() - kChecksumBytes, &sum, kChecksumBytes);
}

}  // namespace kvwave::store
