#include "store/context.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "config/status_macros.h"

namespace kvwave::store {
namespace {

// Copies at least this many bytes per call with streaming stores: a bulk append is far larger
// than the caches, is not read again soon (the next seal reads it once), and streaming stores
// skip reading every destination line before writing it. Smaller (decode-step) appends use
// ordinary stores, leaving the rows in cache for the Attend that follows.
constexpr size_t kStreamingBytes = size_t{64} << 10;

// Copies n rows of `row_bytes` from src (rows `src_stride` bytes apart) to contiguous dst.
void CopyRows(std::byte* dst, const std::byte* src, int64_t n, size_t row_bytes,
              size_t src_stride) {
  if (src_stride == row_bytes && n * row_bytes < kStreamingBytes) {
    std::memcpy(dst, src, n * row_bytes);
    return;
  }
#if defined(__AVX2__)
  if (n * row_bytes >= kStreamingBytes && row_bytes % 32 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 32 == 0) {
    const size_t vectors = row_bytes / 32;
    for (int64_t i = 0; i < n; ++i) {
      const auto* s = reinterpret_cast<const __m256i*>(src + i * src_stride);
      auto* d = reinterpret_cast<__m256i*>(dst + i * row_bytes);
      size_t j = 0;
      for (; j + 4 <= vectors; j += 4) {
        const __m256i a = _mm256_loadu_si256(s + j), b = _mm256_loadu_si256(s + j + 1);
        const __m256i c = _mm256_loadu_si256(s + j + 2), e = _mm256_loadu_si256(s + j + 3);
        _mm256_stream_si256(d + j, a);
        _mm256_stream_si256(d + j + 1, b);
        _mm256_stream_si256(d + j + 2, c);
        _mm256_stream_si256(d + j + 3, e);
      }
      for (; j < vectors; ++j) _mm256_stream_si256(d + j, _mm256_loadu_si256(s + j));
    }
    _mm_sfence();  // streaming stores are weakly ordered: publish them before the lock is released
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * row_bytes, src + i * src_stride, row_bytes);
}

}  // namespace

absl::Status Tail::Reserve(int64_t rows) {
  if (start_ + rows <= capacity_) return absl::OkStatus();
  const size_t live = size_ * row_bytes_;
  if (start_ > 0) {  // move the live rows to the front first (dropped rows leave a gap there)
    std::memmove(keys_.data(), keys_.data() + start_ * row_bytes_, live);
    std::memmove(values_.data(), values_.data() + start_ * row_bytes_, live);
    start_ = 0;
    if (rows <= capacity_) return absl::OkStatus();
  }
  // At least double (amortised O(1) per row), and leave room for one more append of the size
  // that forced the growth: bulk appends come in equal chunks, and each growth copies the tail.
  const int64_t appended = rows - size_;
  const int64_t cap = std::max<int64_t>({rows + appended, capacity_ * 2, 64});
  const size_t bytes = cap * row_bytes_;
  if (capacity_ == 0) {
    KVWAVE_ASSIGN_OR_RETURN(keys_, HostBuffer::Allocate(allocator_, bytes));
    KVWAVE_ASSIGN_OR_RETURN(values_, HostBuffer::Allocate(allocator_, bytes));
  } else {
    // Grown by remapping where the allocator can (no copy of the rows), else copied. If only
    // keys_ grows, the spare capacity is harmless: capacity_ changes only when both have.
    KVWAVE_RETURN_IF_ERROR(keys_.Grow(bytes, live));
    KVWAVE_RETURN_IF_ERROR(values_.Grow(bytes, live));
  }
  capacity_ = cap;
  return absl::OkStatus();
}

absl::Status Tail::Append(const std::byte* k, const std::byte* v, int64_t n, size_t src_stride,
                          MemoryCharge charge) {
  KVWAVE_RETURN_IF_ERROR(Reserve(size_ + n));
  const size_t at = (start_ + size_) * row_bytes_;
  CopyRows(keys_.data() + at, k, n, row_bytes_, src_stride);
  CopyRows(values_.data() + at, v, n, row_bytes_, src_stride);
  size_ += n;
  charge_.Merge(std::move(charge));
  return absl::OkStatus();
}

MemoryCharge Tail::DropFront(int64_t n) {
  KVWAVE_CHECK(n >= 0 && n <= size_);
  size_ -= n;
  start_ = size_ == 0 ? 0 : start_ + n;
  first_position_ += n;
  return charge_.Split(static_cast<int64_t>(2 * n * row_bytes_));
}

void Tail::StartAt(int64_t position) {
  KVWAVE_CHECK(size_ == 0);
  first_position_ = position;
}

Context::Context(uint64_t id, const ModelShape& shape, HostAllocator* allocator)
    : id_(id), shape_(shape) {
  layers_.reserve(shape.layers);
  for (int32_t l = 0; l < shape.layers; ++l) {
    auto layer = std::make_unique<Layer>();
    layer->heads.reserve(shape.kv_heads);
    for (int32_t h = 0; h < shape.kv_heads; ++h) {
      layer->heads.emplace_back(Tail(shape.head_dim, shape.dtype, allocator));
    }
    layers_.push_back(std::move(layer));
  }
}

int64_t Context::SkeletonBytes(const ModelShape& shape, size_t token_ids, int64_t block_tokens) {
  // Per heap allocation, what glibc malloc adds (header and rounding), at least.
  constexpr int64_t kMallocOverhead = 16;
  const int64_t layers = shape.layers, heads = int64_t{shape.layers} * shape.kv_heads;
  int64_t bytes = sizeof(Context) +
                  layers * (sizeof(std::unique_ptr<Layer>) + sizeof(Layer) + 2 * kMallocOverhead) +
                  heads * static_cast<int64_t>(sizeof(HeadKv));
  if (token_ids > 0) {
    const int64_t blocks = block_tokens > 0 ? static_cast<int64_t>(token_ids) / block_tokens : 0;
    bytes += sizeof(PrefixState) + static_cast<int64_t>(token_ids) * sizeof(int32_t) +
             blocks * static_cast<int64_t>(sizeof(BlockHash) + sizeof(BlockSegments) +
                                           sizeof(int32_t) + sizeof(BlockPin));
  }
  return bytes;
}

int64_t Context::AttachedBytes(const ModelShape& shape, int64_t blocks) {
  return blocks * shape.layers * shape.kv_heads *
         static_cast<int64_t>(sizeof(std::shared_ptr<const Segment>));
}

}  // namespace kvwave::store
