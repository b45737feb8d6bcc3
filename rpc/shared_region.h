// A shared-memory region for the Unix-socket data plane: the client creates an anonymous memfd,
// sizes it, seals its size (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) and passes the fd to the
// server with SCM_RIGHTS at Hello; both sides map it MAP_SHARED. Tensors are then named by
// (offset, length) and every such pair is checked against the region with Slice().
//
// The size seal is what makes the server safe: without it a client could shrink the file under
// the server's mapping and turn a read into SIGBUS, so Adopt() refuses an unsealed fd.
//
// Thread-safety: a SharedRegion is a move-only RAII owner of the mapping (and the fd on the
// creating side). Slice() is const and thread-safe; the bytes themselves are shared with another
// process, so their contents are untrusted and may change at any time.
#ifndef KVWAVE_RPC_SHARED_REGION_H_
#define KVWAVE_RPC_SHARED_REGION_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvwave::rpc {

// Address space that all adopted regions may take together (rpc.max_mapped_bytes): a sparse
// sealed memfd costs no memory but its whole size in mappings. Thread-safe (one atomic; relaxed
// is enough: it is a counter with a bound, ordering nothing else). Must outlive every region
// charged to it.
class AddressBudget {
 public:
  explicit AddressBudget(uint64_t limit) : limit_(limit) {}
  // False (nothing charged) when `bytes` more would exceed the limit.
  bool TryCharge(uint64_t bytes);
  void Release(uint64_t bytes) { used_.fetch_sub(bytes, std::memory_order_relaxed); }
  uint64_t used() const { return used_.load(std::memory_order_relaxed); }
  uint64_t limit() const { return limit_; }

 private:
  const uint64_t limit_;
  std::atomic<uint64_t> used_{0};
};

class SharedRegion {
 public:
  // Client side: a new sealed memfd of `bytes` bytes, mapped read-write.
  static absl::StatusOr<SharedRegion> Create(size_t bytes, const std::string& name);
  // Server side: maps a received fd (taking ownership of it: it is closed here, success or not).
  // FailedPrecondition when the fd is not a size-sealed memfd; InvalidArgument when it is empty;
  // ResourceExhausted when it is larger than `max_bytes` or does not fit `budget` (when given;
  // the region then holds its size charged to `budget` until it is unmapped).
  static absl::StatusOr<SharedRegion> Adopt(int fd, size_t max_bytes,
                                            AddressBudget* budget = nullptr);

  SharedRegion() = default;
  SharedRegion(SharedRegion&& other) noexcept;
  SharedRegion& operator=(SharedRegion&& other) noexcept;
  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;
  ~SharedRegion();

  bool valid() const { return base_ != nullptr; }
  std::byte* data() const { return base_; }
  size_t size() const { return size_; }
  int fd() const { return fd_; }  // -1 on the adopting side

  // The bytes [offset, offset + length), or OutOfRange naming `what` when they are not all inside
  // the region (overflow-safe), or InvalidArgument when offset is not a multiple of `alignment`.
  [[nodiscard]] absl::StatusOr<std::span<std::byte>> Slice(uint64_t offset, uint64_t length,
                                                           size_t alignment,
                                                           const char* what) const;
  // True when [p, p + n) lies inside the region; then *offset is p's offset.
  bool Contains(const void* p, size_t n, uint64_t* offset) const;

 private:
  void Reset();
  std::byte* base_ = nullptr;
  size_t size_ = 0;
  int fd_ = -1;
  AddressBudget* budget_ = nullptr;  // charged size_ when set
};

// Sends all of `data` on a connected Unix stream socket with `fd` attached (SCM_RIGHTS) to the
// first chunk. Blocking.
[[nodiscard]] absl::Status SendWithFd(int socket, std::span<const std::byte> data, int fd);

// One recvmsg() into `buffer`, collecting any passed fds into `fds` (close-on-exec; at most 8
// per call: the kernel closes the rest and sets *truncated when given). Returns the number of
// bytes read (0 = orderly EOF); errno-style errors as absl statuses (EAGAIN -> Unavailable).
[[nodiscard]] absl::StatusOr<size_t> ReceiveWithFds(int socket, std::span<std::byte> buffer,
                                                    std::vector<int>& fds,
                                                    bool* truncated = nullptr);

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_SHARED_REGION_H_
