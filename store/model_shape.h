// The shape of a model's KV cache: layers, query heads, KV heads, head dim, element type.
// A plain value type; thread-safe to share.
#ifndef KVWAVE_STORE_MODEL_SHAPE_H_
#define KVWAVE_STORE_MODEL_SHAPE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "config/dtype.h"

namespace kvwave::store {

struct ModelShape {
  int32_t layers = 0;
  int32_t q_heads = 0;   // query heads
  int32_t kv_heads = 0;  // KV heads; query head h reads KV head h / group()
  int32_t head_dim = 0;  // 64, 128, 256, ... (any multiple of 8 up to 1024)
  DType dtype = DType::kBF16;

  int32_t group() const { return q_heads / kv_heads; }
  // Bytes of one token's keys (or values) for one layer: kv_heads * head_dim * element size.
  int64_t TokenBytesPerLayer() const {
    return int64_t{kv_heads} * head_dim * static_cast<int64_t>(ElementSize(dtype));
  }
  bool operator==(const ModelShape&) const = default;
};

// OK, or InvalidArgument naming the bad field: layers in [1, 1024], kv_heads >= 1, q_heads a
// multiple of kv_heads, head_dim a multiple of 8 in [8, 1024].
[[nodiscard]] absl::Status Validate(const ModelShape& shape);
std::string ToString(const ModelShape& shape);

}  // namespace kvwave::store

#endif  // KVWAVE_STORE_MODEL_SHAPE_H_
