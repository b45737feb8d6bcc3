// Reading attention traces: the .npy files of ../shared/data/README.md (q, k, v; float16 or
// float32; q (layers, tokens, q_heads, head_dim), k and v (layers, tokens, kv_heads, head_dim)).
// Files are memory-mapped read-only, so 1M-token traces cost no copy.
//
// Thread-safety: an NpyArray or Trace is immutable after Open; concurrent reads are safe.
#ifndef KVWAVE_CLIENT_TRACE_FILE_H_
#define KVWAVE_CLIENT_TRACE_FILE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "config/dtype.h"

namespace kvwave::trace {

// A read-only, memory-mapped, C-order .npy array of float16 or float32.
class NpyArray {
 public:
  // Errors (InvalidArgument / NotFound / DataLoss) name the file and what is wrong: bad magic,
  // unsupported version or dtype, Fortran order, a header that does not parse, a file shorter
  // than its shape says.
  static absl::StatusOr<NpyArray> Open(const std::string& path);

  NpyArray() = default;  // empty: no data
  NpyArray(NpyArray&&) noexcept;
  NpyArray& operator=(NpyArray&&) noexcept;
  ~NpyArray();

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t size() const;  // number of elements
  const void* data() const { return data_; }
  // Element i as float.
  float At(int64_t i) const;
  // n elements starting at flat index `first`, converted to float.
  void CopyFloats(int64_t first, int64_t n, float* dst) const;

 private:
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
};

// Writes a C-order .npy file (float16 or float32) with the given shape.
[[nodiscard]] absl::Status WriteNpy(const std::string& path, DType dtype,
                                    const std::vector<int64_t>& shape, const void* data);

// A trace PREFIX: PREFIX_q.npy, PREFIX_k.npy, PREFIX_v.npy, shapes checked against each other.
struct Trace {
  NpyArray q, k, v;
  int64_t layers = 0, tokens = 0, q_heads = 0, kv_heads = 0, head_dim = 0;

  static absl::StatusOr<Trace> Open(const std::string& prefix);

  // Flat element offsets into q / k / v.
  int64_t QIndex(int64_t layer, int64_t t, int64_t h) const {
    return ((layer * tokens + t) * q_heads + h) * head_dim;
  }
  int64_t KvIndex(int64_t layer, int64_t t, int64_t h) const {
    return ((layer * tokens + t) * kv_heads + h) * head_dim;
  }
};

// The default real trace (../shared/data/traces/dd16k relative to the source tree, or
// $KVWAVE_TRACE), or "" when it is not present.
std::string DefaultTracePrefix(const std::string& source_dir);

}  // namespace kvwave::trace

#endif  // KVWAVE_CLIENT_TRACE_FILE_H_
