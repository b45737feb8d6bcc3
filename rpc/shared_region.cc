#include "rpc/shared_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvwave::rpc {
namespace {

absl::Status Errno(const char* what) {
  const int err = errno;
  const std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  if (err == EAGAIN || err == EWOULDBLOCK) return absl::UnavailableError(msg);
  if (err == ENOMEM) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

}  // namespace

absl::StatusOr<SharedRegion> SharedRegion::Create(size_t bytes, const std::string& name) {
  if (bytes == 0) return absl::InvalidArgumentError("shared region of 0 bytes");
  const int fd = memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Errno("memfd_create");
  SharedRegion region;
  region.fd_ = fd;
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return Errno("ftruncate(memfd)");
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return Errno("F_ADD_SEALS");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return Errno("mmap(memfd)");
  region.base_ = static_cast<std::byte*>(p);
  region.size_ = bytes;
  return region;
}

bool AddressBudget::TryCharge(uint64_t bytes) {
  uint64_t used = used_.load(std::memory_order_relaxed);
  do {
    if (bytes > limit_ || used > limit_ - bytes) return false;
  } while (!used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  return true;
}

absl::StatusOr<SharedRegion> SharedRegion::Adopt(int fd, size_t max_bytes, AddressBudget* budget) {
  struct FdCloser {
    int fd;
    ~FdCloser() { close(fd); }
  } closer{fd};
  const int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    return absl::FailedPreconditionError(
        "shared-memory fd is not a memfd sealed against shrinking (F_SEAL_SHRINK)");
  }
  struct stat st;
  if (fstat(fd, &st) != 0) return Errno("fstat(shared-memory fd)");
  if (st.st_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("shared-memory region of ", st.st_size,
                                                   " bytes (allowed: 1 to ", max_bytes, ")"));
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("shared-memory region of ", st.st_size,
                     " bytes exceeds rpc.max_region_bytes = ", max_bytes));
  }
  const size_t bytes = static_cast<size_t>(st.st_size);
  if (budget != nullptr && !budget->TryCharge(bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "shared-memory region of ", bytes, " bytes: the regions mapped for all sessions (",
        budget->used(), " bytes) would exceed rpc.max_mapped_bytes = ", budget->limit()));
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  if (p == MAP_FAILED) {
    absl::Status st = Errno("mmap(shared-memory fd)");
    if (budget != nullptr) budget->Release(bytes);
    return st;
  }
  SharedRegion region;
  region.base_ = static_cast<std::byte*>(p);
  region.size_ = bytes;
  region.budget_ = budget;
  return region;
}

SharedRegion::SharedRegion(SharedRegion&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      fd_(std::exchange(other.fd_, -1)),
      budget_(std::exchange(other.budget_, nullptr)) {}

SharedRegion& SharedRegion::operator=(SharedRegion&& other) noexcept {
  if (this != &other) {
    Reset();
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    fd_ = std::exchange(other.fd_, -1);
    budget_ = std::exchange(other.budget_, nullptr);
  }
  return *this;
}

SharedRegion::~SharedRegion() { Reset(); }

void SharedRegion::Reset() {
  if (base_ != nullptr) munmap(base_, size_);
  if (fd_ >= 0) close(fd_);
  if (budget_ != nullptr) budget_->Release(size_);
  base_ = nullptr;
  size_ = 0;
  fd_ = -1;
  budget_ = nullptr;
}

absl::StatusOr<std::span<std::byte>> SharedRegion::Slice(uint64_t offset, uint64_t length,
                                                         size_t alignment, const char* what) const {
  if (offset > size_ || length > size_ - offset) {
    return absl::OutOfRangeError(absl::StrCat(what, ": bytes [", offset, ", +", length,
                                              ") outside the shared region of ", size_, " bytes"));
  }
  if (alignment > 1 && offset % alignment != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": offset ", offset, " is not a multiple of ", alignment));
  }
  return std::span<std::byte>(base_ + offset, static_cast<size_t>(length));
}

bool SharedRegion::Contains(const void* p, size_t n, uint64_t* offset) const {
  const auto* b = static_cast<const std::byte*>(p);
  if (base_ == nullptr || b < base_ || b > base_ + size_) return false;
  const size_t off = static_cast<size_t>(b - base_);
  if (n > size_ - off) return false;
  *offset = off;
  return true;
}

absl::Status SendWithFd(int socket, std::span<const std::byte> data, int fd) {
  bool fd_sent = false;
  while (!data.empty()) {
    iovec iov{const_cast<std::byte*>(data.data()), data.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (!fd_sent) {
      std::memset(control, 0, sizeof(control));
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
      cmsg->cmsg_level = SOL_SOCKET;
      cmsg->cmsg_type = SCM_RIGHTS;
      cmsg->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    }
    const ssize_t n = sendmsg(socket, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("sendmsg");
    }
    fd_sent = true;
    data = data.subspan(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> ReceiveWithFds(int socket, std::span<std::byte> buffer,
                                      std::vector<int>& fds, bool* truncated) {
  iovec iov{buffer.data(), buffer.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 8)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return Errno("recvmsg");
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      fds.push_back(fd);
    }
  }
  // MSG_CTRUNC: more fds were sent than fit; the kernel closed the rest. Nothing leaks here.
  if (truncated != nullptr && (msg.msg_flags & MSG_CTRUNC) != 0) *truncated = true;
  return static_cast<size_t>(n);
}

}  // namespace kvwave::rpc
