// The reply backlog of one connection: bytes of replies that are queued and not yet written to
// the client, plus the inline output bytes that running requests have reserved before doing
// their work (rpc.max_queued_reply_bytes). A request whose reply does not fit is deferred by the
// connection until the client reads, instead of being computed into memory nobody reads.
//
// Invariant: bytes() = sum of reservations of running requests + sizes of queued replies.
// TryReserve always admits a request when nothing else is in the backlog (a reply reserves its
// tensors one by one and names what it already holds), so a lone reply of any size up to
// rpc.max_frame_bytes can run and progress never stops.
//
// Thread-safety: one atomic, shared by the connection's strand and its compute tasks; relaxed
// order suffices: it is a bounded counter and orders no other memory.
#ifndef KVWAVE_RPC_REPLY_BACKLOG_H_
#define KVWAVE_RPC_REPLY_BACKLOG_H_

#include <atomic>
#include <cstdint>

namespace kvwave::rpc {

class ReplyBacklog {
 public:
  explicit ReplyBacklog(uint64_t limit) : limit_(limit) {}

  // Charges `bytes` if they fit under the limit, or if the backlog holds nothing but the
  // caller's own `held` bytes; false otherwise (nothing charged).
  bool TryReserve(uint64_t bytes, uint64_t held = 0) {
    uint64_t cur = bytes_.load(std::memory_order_relaxed);
    do {
      if (cur != held && (bytes > limit_ || cur > limit_ - bytes)) return false;
    } while (!bytes_.compare_exchange_weak(cur, cur + bytes, std::memory_order_relaxed));
    return true;
  }
  void Add(uint64_t bytes) { bytes_.fetch_add(bytes, std::memory_order_relaxed); }
  void Release(uint64_t bytes) { bytes_.fetch_sub(bytes, std::memory_order_relaxed); }
  uint64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }
  bool full() const { return bytes() >= limit_; }
  uint64_t limit() const { return limit_; }

 private:
  const uint64_t limit_;
  std::atomic<uint64_t> bytes_{0};
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_REPLY_BACKLOG_H_
