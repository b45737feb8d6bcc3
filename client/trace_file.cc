#include "client/trace_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "config/status_macros.h"

namespace kvwave::trace {
namespace {

absl::Status Bad(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

// Finds the value text after 'key': in a numpy header dict.
absl::StatusOr<absl::string_view> HeaderField(absl::string_view header, absl::string_view key) {
  std::string quoted = absl::StrCat("'", key, "'");
  size_t at = header.find(quoted);
  if (at == absl::string_view::npos) return absl::InvalidArgumentError("no " + quoted);
  size_t colon = header.find(':', at + quoted.size());
  if (colon == absl::string_view::npos) return absl::InvalidArgumentError("no ':' after " + quoted);
  return absl::StripLeadingAsciiWhitespace(header.substr(colon + 1));
}

absl::StatusOr<std::vector<int64_t>> ParseShape(absl::string_view text) {
  if (text.empty() || text[0] != '(') return absl::InvalidArgumentError("shape is not a tuple");
  size_t close = text.find(')');
  if (close == absl::string_view::npos) return absl::InvalidArgumentError("unterminated shape");
  std::vector<int64_t> shape;
  for (absl::string_view part : absl::StrSplit(text.substr(1, close - 1), ',')) {
    part = absl::StripAsciiWhitespace(part);
    if (part.empty()) continue;
    int64_t dim;
    if (!absl::SimpleAtoi(part, &dim) || dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat("bad dimension '", part, "'"));
    }
    shape.push_back(dim);
  }
  return shape;
}

}  // namespace

NpyArray::NpyArray(NpyArray&& o) noexcept { *this = std::move(o); }
NpyArray& NpyArray::operator=(NpyArray&& o) noexcept {
  if (this != &o) {
    if (map_ != nullptr) munmap(map_, map_bytes_);
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    data_ = std::exchange(o.data_, nullptr);
    dtype_ = o.dtype_;
    shape_ = std::move(o.shape_);
  }
  return *this;
}
NpyArray::~NpyArray() {
  if (map_ != nullptr) munmap(map_, map_bytes_);
}

int64_t NpyArray::size() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

float NpyArray::At(int64_t i) const {
  if (dtype_ == DType::kF32) return static_cast<const float*>(data_)[i];
  return F16ToFloat(static_cast<const uint16_t*>(data_)[i]);
}

void NpyArray::CopyFloats(int64_t first, int64_t n, float* dst) const {
  const auto* base = static_cast<const std::byte*>(data_) + first * ElementSize(dtype_);
  ToFloat(base, dtype_, dst, static_cast<size_t>(n));
}

absl::StatusOr<NpyArray> NpyArray::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": ", std::strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat: ", std::strerror(errno)));
  }
  size_t bytes = static_cast<size_t>(st.st_size);
  if (bytes < 12) {
    ::close(fd);
    return Bad(path, "too short for a .npy header");
  }
  void* map = mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return absl::InternalError(absl::StrCat(path, ": mmap failed"));
  NpyArray a;
  a.map_ = map;
  a.map_bytes_ = bytes;
  const auto* p = static_cast<const unsigned char*>(map);
  if (std::memcmp(p, "\x93NUMPY", 6) != 0) return Bad(path, "not a .npy file (bad magic)");
  int major = p[6];
  size_t header_len, header_at;
  if (major == 1) {
    header_len = p[8] | (p[9] << 8);
    header_at = 10;
  } else if (major == 2 || major == 3) {
    header_len = p[8] | (p[9] << 8) | (size_t{p[10]} << 16) | (size_t{p[11]} << 24);
    header_at = 12;
  } else {
    return Bad(path, absl::StrCat("unsupported .npy version ", major));
  }
  if (header_at + header_len > bytes) return Bad(path, "truncated header");
  absl::string_view header(reinterpret_cast<const char*>(p + header_at), header_len);
  auto descr = HeaderField(header, "descr");
  auto order = HeaderField(header, "fortran_order");
  auto shape_text = HeaderField(header, "shape");
  if (!descr.ok() || !order.ok() || !shape_text.ok()) return Bad(path, "header does not parse");
  if (absl::StartsWith(*descr, "'<f2'")) {
    a.dtype_ = DType::kF16;
  } else if (absl::StartsWith(*descr, "'<f4'")) {
    a.dtype_ = DType::kF32;
  } else {
    return Bad(path, absl::StrCat("unsupported dtype ", descr->substr(0, 6), " (float16/32 only)"));
  }
  if (!absl::StartsWith(*order, "False")) return Bad(path, "Fortran order is not supported");
  auto shape = ParseShape(*shape_text);
  if (!shape.ok()) return Bad(path, shape.status().message());
  a.shape_ = std::move(*shape);
  // The element count must not overflow when multiplied out (a hostile header could wrap it).
  unsigned __int128 elements = 1;
  for (int64_t dim : a.shape_) {
    elements *= static_cast<uint64_t>(dim);
    if (elements > (static_cast<unsigned __int128>(1) << 60))
      return Bad(path, "shape is too large");
  }
  size_t data_at = header_at + header_len;
  size_t need = static_cast<size_t>(a.size()) * ElementSize(a.dtype_);
  if (bytes - data_at < need) {
    return absl::DataLossError(absl::StrCat(path, ": truncated: shape needs ", need,
                                            " data bytes, file has ", bytes - data_at));
  }
  a.data_ = p + data_at;
  return a;
}

absl::Status WriteNpy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
                      const void* data) {
  if (dtype == DType::kBF16) return absl::InvalidArgumentError("npy has no bfloat16");
  std::string dims;
  int64_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    absl::StrAppend(&dims, i == 0 ? "" : ", ", shape[i]);
    n *= shape[i];
  }
  if (shape.size() == 1) dims += ",";  // a 1-tuple keeps its comma
  std::string header = absl::StrCat("{'descr': '", dtype == DType::kF16 ? "<f2" : "<f4",
                                    "', 'fortran_order': False, 'shape': (", dims, "), }");
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return absl::InternalError(absl::StrCat(path, ": ", std::strerror(errno)));
  unsigned char pre[10] = {0x93,
                           'N',
                           'U',
                           'M',
                           'P',
                           'Y',
                           1,
                           0,
                           static_cast<unsigned char>(header.size() & 0xff),
                           static_cast<unsigned char>(header.size() >> 8)};
  size_t data_bytes = static_cast<size_t>(n) * ElementSize(dtype);
  bool ok = std::fwrite(pre, 1, 10, f) == 10 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
            std::fwrite(data, 1, data_bytes, f) == data_bytes;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

absl::StatusOr<Trace> Trace::Open(const std::string& prefix) {
  Trace t;
  KVWAVE_ASSIGN_OR_RETURN(t.q, NpyArray::Open(prefix + "_q.npy"));
  KVWAVE_ASSIGN_OR_RETURN(t.k, NpyArray::Open(prefix + "_k.npy"));
  KVWAVE_ASSIGN_OR_RETURN(t.v, NpyArray::Open(prefix + "_v.npy"));
  const auto &qs = t.q.shape(), &ks = t.k.shape(), &vs = t.v.shape();
  if (qs.size() != 4 || ks.size() != 4 || vs.size() != 4) {
    return absl::InvalidArgumentError(prefix +
                                      ": q, k, v must be 4-D (layers, tokens, heads, dim)");
  }
  if (ks != vs) return absl::InvalidArgumentError(prefix + ": k and v shapes differ");
  if (qs[0] != ks[0] || qs[1] != ks[1] || qs[3] != ks[3]) {
    return absl::InvalidArgumentError(prefix + ": q and k disagree on layers, tokens or head dim");
  }
  if (ks[2] < 1 || qs[2] < 1 || qs[2] % ks[2] != 0) {
    return absl::InvalidArgumentError(prefix + ": query heads are not a multiple of KV heads");
  }
  if (qs[0] < 1 || qs[1] < 1 || qs[3] < 1) return absl::InvalidArgumentError(prefix + ": empty");
  t.layers = qs[0];
  t.tokens = qs[1];
  t.q_heads = qs[2];
  t.kv_heads = ks[2];
  t.head_dim = qs[3];
  return t;
}

std::string DefaultTracePrefix(const std::string& source_dir) {
  if (const char* env = std::getenv("KVWAVE_TRACE"); env != nullptr && *env != '\0') return env;
  std::string prefix = source_dir + "/../shared/data/traces/dd16k";
  if (std::filesystem::exists(prefix + "_q.npy")) return prefix;
  return "";
}

}  // namespace kvwave::trace
