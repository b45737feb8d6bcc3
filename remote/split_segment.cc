#include "remote/split_segment.h"

#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"

namespace kvwave::remote {
namespace {

static_assert(std::endian::native == std::endian::little, "the format assumes little-endian");

constexpr uint32_t kMagic = 0x5857564B;  // "KVWX"
constexpr size_t kHeaderBytes = 64;
constexpr int64_t kMaxTokens = int64_t{1} << 26;
constexpr int64_t kMaxHeadDim = 4096;
constexpr int64_t kMaxPageTokens = int64_t{1} << 20;

struct Header {
  uint32_t magic = kMagic;
  uint32_t version = kSplitSegmentVersion;
  int64_t first_position = 0;
  int32_t num_tokens = 0;
  int32_t steady_tokens = 0;
  int32_t head_dim = 0;
  int32_t page_tokens = 0;
  int32_t num_clusters = 0;
  uint8_t dtype = 0;
  uint8_t pad[3] = {0, 0, 0};
  int64_t num_rows = 0;
  uint64_t kv_bytes = 0;
  uint64_t reserved = 0;
};
static_assert(sizeof(Header) == kHeaderBytes);

int64_t PagesFor(int64_t n, int64_t page) { return (n + page - 1) / page; }

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

// Sizes `v` (empty) to n elements and copies them from `src`. A fresh block's pages are faulted
// in with one madvise (MADV_POPULATE_WRITE) before they are written: on this VM that costs about
// 0.6 of taking a fault per 4 KiB page (an attach decodes ~10% of a prefix's bytes into fresh
// vectors: 73 MB for the trace model's 128K tokens). Where the kernel lacks it, the pages fault
// as usual.
template <typename T>
void FillFresh(std::vector<T>& v, const char* src, size_t n) {
  const size_t bytes = n * sizeof(T);
  v.reserve(n);
  static const uintptr_t kPage = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(v.data()) + kPage - 1) & ~(kPage - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(v.data()) + bytes) & ~(kPage - 1);
  if (bytes >= (size_t{64} << 10) && hi > lo) {
    (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
  }
  v.resize(n);
  if (bytes > 0) std::memcpy(v.data(), src, bytes);
}

absl::Status DataLoss(absl::string_view what) {
  return absl::DataLossError(absl::StrCat("remote segment index: ", what));
}

// Sizes of the index stream's sections, from a plausible header.
struct Layout {
  size_t row_bytes, steady_rows, steady_bytes, cluster_floats, sizes, spreads, tor, sums, total;
};

Layout LayoutOf(const Header& h) {
  Layout l;
  l.row_bytes = static_cast<size_t>(h.head_dim) * ElementSize(static_cast<DType>(h.dtype));
  l.steady_rows =
      h.num_clusters > 0
          ? static_cast<size_t>(PagesFor(h.steady_tokens, h.page_tokens) * h.page_tokens)
          : static_cast<size_t>(h.num_rows);
  l.steady_bytes = l.steady_rows * l.row_bytes;
  l.cluster_floats = static_cast<size_t>(h.num_clusters) * h.head_dim * sizeof(float);
  l.sizes = static_cast<size_t>(h.num_clusters) * sizeof(int32_t);
  l.spreads = static_cast<size_t>(h.num_clusters) * sizeof(float);
  l.tor = static_cast<size_t>(h.num_rows) * sizeof(int32_t);
  l.sums = static_cast<size_t>(h.num_clusters) * sizeof(uint64_t);
  l.total = kHeaderBytes + 2 * l.steady_bytes + 2 * l.cluster_floats + l.sizes + l.spreads + l.tor +
            l.sums;
  return l;
}

}  // namespace

uint64_t KvChecksum(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

int64_t SplitSegmentChargedBytes(uint64_t index_bytes, uint64_t kv_bytes, int32_t num_tokens) {
  // Segment::ChargedBytes = 2 rows row_bytes + C (2 d 4 + 4 + 4 + 8) + 4 rows + 8 n, and by
  // LayoutOf the index stream holds kHeaderBytes + 2 steady_rows row_bytes + C (2 d 4 + 4 + 4 + 8)
  // + 4 rows
  // while the KV stream holds the other 2 (rows - steady_rows) row_bytes.
  constexpr uint64_t kMaxStreamBytes = uint64_t{1} << 48;  // keeps the sum far from overflow
  if (index_bytes < kHeaderBytes || index_bytes > kMaxStreamBytes || kv_bytes > kMaxStreamBytes ||
      num_tokens < 1 || num_tokens > kMaxTokens) {
    return -1;
  }
  return static_cast<int64_t>(index_bytes - kHeaderBytes + kv_bytes) + int64_t{num_tokens} * 8;
}

uint64_t ClusterKvOffset(const store::Segment& s, int32_t c) {
  return 2 * static_cast<uint64_t>(s.cluster_row(c) - s.steady_rows()) * s.row_bytes();
}

uint64_t ClusterKvBytes(const store::Segment& s, int32_t c) {
  return 2 * static_cast<uint64_t>(s.cluster_end_row(c) - s.cluster_row(c)) * s.row_bytes();
}

void EncodeSplitSegment(const store::Segment& s, std::string* index, std::string* kv) {
  KVWAVE_CHECK(s.rows_resident());
  Header h;
  h.first_position = s.first_position();
  h.num_tokens = s.num_tokens();
  h.steady_tokens = s.steady_tokens();
  h.head_dim = s.head_dim();
  h.page_tokens = s.page_tokens();
  h.num_clusters = s.num_clusters();
  h.dtype = static_cast<uint8_t>(s.dtype());
  h.num_rows = s.num_rows();
  h.kv_bytes = 2 * static_cast<uint64_t>(s.num_rows() - s.steady_rows()) * s.row_bytes();
  const Layout l = LayoutOf(h);
  KVWAVE_CHECK(l.steady_rows == static_cast<size_t>(s.steady_rows()));
  kv->resize(h.kv_bytes);
  std::vector<uint64_t> sums(s.num_clusters());
  for (int32_t c = 0; c < s.num_clusters(); ++c) {
    const int64_t r0 = s.cluster_row(c), rows = s.cluster_end_row(c) - r0;
    const size_t n = static_cast<size_t>(rows) * s.row_bytes();
    std::byte* out = reinterpret_cast<std::byte*>(kv->data()) + ClusterKvOffset(s, c);
    if (n > 0) {
      std::memcpy(out, s.key_row(r0), n);
      std::memcpy(out + n, s.value_row(r0), n);
    }
    sums[c] = KvChecksum(out, 2 * n);
  }
  index->clear();
  index->reserve(l.total);
  auto put = [index](const void* p, size_t n) {
    index->append(reinterpret_cast<const char*>(p), n);
  };
  put(&h, sizeof(h));
  put(s.key_row(0), l.steady_bytes);
  put(s.value_row(0), l.steady_bytes);
  put(s.centroids().data(), l.cluster_floats);
  put(s.sizes().data(), l.sizes);
  put(s.value_sums().data(), l.cluster_floats);
  put(s.key_spreads().data(), l.spreads);
  put(s.token_of_rows().data(), l.tor);
  put(sums.data(), l.sums);
}

absl::StatusOr<SplitIndex> DecodeSplitSegment(
    absl::string_view index, absl::string_view kv,
    const std::function<std::shared_ptr<store::PendingRows>(const std::vector<bool>&)>&
        make_pending,
    store::HostAllocator* allocator, store::MemoryCharge reserved) {
  if (index.size() < kHeaderBytes) return DataLoss("short header");
  Header h;
  std::memcpy(&h, index.data(), kHeaderBytes);
  if (h.magic != kMagic) return DataLoss("bad magic");
  if (h.version != kSplitSegmentVersion) return DataLoss(absl::StrCat("version ", h.version));
  if (h.num_tokens < 1 || h.num_tokens > kMaxTokens || h.steady_tokens < 0 ||
      h.steady_tokens > h.num_tokens || h.head_dim < 1 || h.head_dim > kMaxHeadDim ||
      h.page_tokens < 1 || h.page_tokens > kMaxPageTokens || h.num_clusters < 0 ||
      h.num_clusters > h.num_tokens || h.num_rows < h.num_tokens ||
      h.num_rows > 2 * kMaxTokens + int64_t{h.num_clusters} * h.page_tokens ||
      h.dtype > static_cast<uint8_t>(DType::kBF16)) {
    return DataLoss("implausible header");
  }
  const Layout l = LayoutOf(h);
  if (index.size() != l.total) {
    return DataLoss(absl::StrCat("size ", index.size(), ", header implies ", l.total));
  }
  if (l.steady_rows > static_cast<size_t>(h.num_rows) ||
      h.kv_bytes != 2 * (static_cast<uint64_t>(h.num_rows) - l.steady_rows) * l.row_bytes) {
    return DataLoss("KV size does not match the rows");
  }
  if (!kv.empty() && kv.size() != h.kv_bytes) return DataLoss("KV stream of another size");
  if (kv.empty() && h.kv_bytes > 0 && !make_pending) return DataLoss("no KV stream");
  store::SegmentParts parts;
  parts.first_position = h.first_position;
  parts.num_tokens = h.num_tokens;
  parts.steady_tokens = h.steady_tokens;
  parts.head_dim = h.head_dim;
  parts.dtype = static_cast<DType>(h.dtype);
  parts.page_tokens = h.page_tokens;
  parts.num_clusters = h.num_clusters;
  const int64_t charge = store::Segment::ChargedBytes(h.num_rows, h.num_tokens, h.num_clusters,
                                                      h.head_dim, parts.dtype);
  if (charge != reserved.bytes()) {
    return DataLoss(
        absl::StrCat("charges ", charge, " bytes, its stream sizes imply ", reserved.bytes()));
  }
  const size_t rows_bytes = static_cast<size_t>(h.num_rows) * l.row_bytes;
  KVWAVE_ASSIGN_OR_RETURN(parts.keys, store::HostBuffer::Allocate(allocator, rows_bytes));
  KVWAVE_ASSIGN_OR_RETURN(parts.values, store::HostBuffer::Allocate(allocator, rows_bytes));
  const char* in = index.data() + kHeaderBytes;
  auto take = [&in](void* dst, size_t n) {
    if (n > 0) std::memcpy(dst, in, n);
    in += n;
  };
  take(parts.keys.data(), l.steady_bytes);
  take(parts.values.data(), l.steady_bytes);
  auto fill = [&in](auto& v, size_t n) {
    FillFresh(v, in, n);
    in += n * sizeof(v[0]);
  };
  fill(parts.centroids, l.cluster_floats / sizeof(float));
  fill(parts.sizes, static_cast<size_t>(h.num_clusters));
  fill(parts.value_sums, l.cluster_floats / sizeof(float));
  fill(parts.key_spreads, static_cast<size_t>(h.num_clusters));
  fill(parts.token_of_row, static_cast<size_t>(h.num_rows));
  SplitIndex out;
  out.cluster_checksums.resize(h.num_clusters);
  take(out.cluster_checksums.data(), l.sums);
  out.kv_bytes = h.kv_bytes;
  std::shared_ptr<store::PendingRows> pending;
  if (kv.empty() && h.kv_bytes > 0) {
    std::vector<bool> empty(h.num_clusters);
    for (int32_t c = 0; c < h.num_clusters; ++c) empty[c] = parts.sizes[c] <= 0;
    pending = make_pending(empty);
    parts.pending = pending;
  }
  std::byte* keys = parts.keys.data();
  std::byte* values = parts.values.data();
  auto segment = store::Segment::FromParts(std::move(parts), reserved);
  if (!segment.ok()) return DataLoss(segment.status().message());
  out.segment = *std::move(segment);
  if (pending == nullptr && h.kv_bytes > 0) {
    const store::Segment& s = *out.segment;
    for (int32_t c = 0; c < s.num_clusters(); ++c) {
      const uint64_t n = ClusterKvBytes(s, c);
      if (n == 0) continue;
      const std::byte* bytes =
          reinterpret_cast<const std::byte*>(kv.data()) + ClusterKvOffset(s, c);
      CopyClusterRows(s, c, bytes, keys, values);
    }
  }
  return out;
}

void CopyClusterRows(const store::Segment& s, int32_t c, const std::byte* bytes, std::byte* keys,
                     std::byte* values) {
  const int64_t r0 = s.cluster_row(c);
  const size_t n = static_cast<size_t>(s.cluster_end_row(c) - r0) * s.row_bytes();
  std::memcpy(keys + r0 * s.row_bytes(), bytes, n);
  std::memcpy(values + r0 * s.row_bytes(), bytes + n, n);
}

}  // namespace kvwave::remote
