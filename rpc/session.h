// One client connection's server-side state: its id, its shared-memory region (Unix socket only)
// and the contexts it owns. The server releases the contexts when the session ends, whether the
// client said goodbye or vanished.
//
// Lifecycle: created on accept (with the peer's credentials on a Unix socket) -> Hello sets the
// region and the principal (once, on the connection's strand, before any request is dispatched,
// so both are immutable while requests run) -> requests add and remove contexts from compute
// threads -> on disconnect, after the last in-flight request, the contexts are taken and closed.
// The context table is also the ownership check: a context not in it is NOT_FOUND to this session.
//
// Thread-safety: the context table is guarded by a mutex; region() and principal() are read-only
// after Hello.
#ifndef KVWAVE_RPC_SESSION_H_
#define KVWAVE_RPC_SESSION_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "engine/engine.h"
#include "rpc/auth.h"
#include "rpc/shared_region.h"

namespace kvwave::rpc {

// A GPU client's registration (issue 17): its open device buffers, and the mutex that makes
// its calls one at a time (the events are one pair per registration).
struct DeviceRegistration {
  explicit DeviceRegistration(std::unique_ptr<engine::DeviceBuffers> b) : buffers(std::move(b)) {}
  std::mutex mu;
  std::unique_ptr<engine::DeviceBuffers> buffers;
};

class Session {
 public:
  Session(uint64_t id, bool local, PeerCredentials peer = {})
      : id_(id), local_(local), peer_(peer) {}
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  uint64_t id() const { return id_; }
  bool local() const { return local_; }                  // Unix socket (may pass a shared region)
  const PeerCredentials& peer() const { return peer_; }  // SO_PEERCRED (Unix socket only)

  bool hello_done() const { return hello_done_; }
  // REQUIRES: called once, before any request of this session is dispatched.
  void CompleteHello(SharedRegion region, Principal principal) {
    region_ = std::move(region);
    principal_ = std::move(principal);
    hello_done_ = true;
  }
  // Who the session is (rpc/auth.h); set by Hello.
  const Principal& principal() const { return principal_; }
  // nullptr when the session has no shared region.
  const SharedRegion* region() const { return region_.valid() ? &region_ : nullptr; }

  void AddContext(engine::ContextId id, const store::ModelShape& shape);
  std::optional<store::ModelShape> Shape(engine::ContextId id) const;
  bool RemoveContext(engine::ContextId id);
  std::vector<engine::ContextId> TakeContexts();
  std::vector<engine::ContextId> ContextIds() const;  // ascending
  size_t context_count() const;

  // GPU clients' registrations: at most kMaxDeviceRegistrations per session.
  static constexpr size_t kMaxDeviceRegistrations = 64;
  // The new registration's id, or 0 when the session holds the most already.
  uint64_t AddDevice(std::shared_ptr<DeviceRegistration> reg);
  std::shared_ptr<DeviceRegistration> Device(uint64_t id) const;  // null: unknown
  std::shared_ptr<DeviceRegistration> RemoveDevice(uint64_t id);  // null: unknown
  std::vector<std::shared_ptr<DeviceRegistration>> TakeDevices();

 private:
  const uint64_t id_;
  const bool local_;
  const PeerCredentials peer_;
  bool hello_done_ = false;
  Principal principal_;
  SharedRegion region_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<engine::ContextId, store::ModelShape> contexts_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, std::shared_ptr<DeviceRegistration>> devices_ ABSL_GUARDED_BY(mu_);
  uint64_t next_device_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_SESSION_H_
