#include "store/context.h"

#include <algorithm>
#include <cstring>

#include "config/status_macros.h"

namespace kvwave::store {

absl::Status Tail::Reserve(int64_t rows) {
  if (rows <= capacity_) return absl::OkStatus();
  int64_t cap = std::max<int64_t>({rows, capacity_ * 2, 64});
  KVWAVE_ASSIGN_OR_RETURN(HostBuffer k, HostBuffer::Allocate(allocator_, cap * row_bytes_));
  KVWAVE_ASSIGN_OR_RETURN(HostBuffer v, HostBuffer::Allocate(allocator_, cap * row_bytes_));
  if (size_ > 0) {
    std::memcpy(k.data(), keys_.data(), size_ * row_bytes_);
    std::memcpy(v.data(), values_.data(), size_ * row_bytes_);
  }
  keys_ = std::move(k);
  values_ = std::move(v);
  capacity_ = cap;
  return absl::OkStatus();
}

absl::Status Tail::Append(const std::byte* k, const std::byte* v, int64_t n, size_t src_stride,
                          MemoryCharge charge) {
  KVWAVE_RETURN_IF_ERROR(Reserve(size_ + n));
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(keys_.data() + (size_ + i) * row_bytes_, k + i * src_stride, row_bytes_);
    std::memcpy(values_.data() + (size_ + i) * row_bytes_, v + i * src_stride, row_bytes_);
  }
  size_ += n;
  charge_.Merge(std::move(charge));
  return absl::OkStatus();
}

MemoryCharge Tail::DropFront(int64_t n) {
  KVWAVE_CHECK(n >= 0 && n <= size_);
  int64_t rest = size_ - n;
  if (rest > 0) {
    std::memmove(keys_.data(), keys_.data() + n * row_bytes_, rest * row_bytes_);
    std::memmove(values_.data(), values_.data() + n * row_bytes_, rest * row_bytes_);
  }
  size_ = rest;
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

}  // namespace kvwave::store
