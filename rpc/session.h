// One client connection's server-side state: its id, its shared-memory region (Unix socket only)
// and the contexts it owns. The server releases the contexts when the session ends, whether the
// client said goodbye or vanished.
//
// Lifecycle: created on accept -> Hello sets the region (once, on the connection's strand, before
// any request is dispatched, so the region is immutable while requests run) -> requests add and
// remove contexts from compute threads -> on disconnect, after the last in-flight request, the
// contexts are taken and closed.
//
// Thread-safety: the context table is guarded by a mutex; region() is read-only after Hello.
#ifndef KVWAVE_RPC_SESSION_H_
#define KVWAVE_RPC_SESSION_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "engine/engine.h"
#include "rpc/shared_region.h"

namespace kvwave::rpc {

class Session {
 public:
  Session(uint64_t id, bool local) : id_(id), local_(local) {}
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  uint64_t id() const { return id_; }
  bool local() const { return local_; }  // Unix socket (may pass a shared region)

  bool hello_done() const { return hello_done_; }
  // REQUIRES: called once, before any request of this session is dispatched.
  void CompleteHello(SharedRegion region) {
    region_ = std::move(region);
    hello_done_ = true;
  }
  // nullptr when the session has no shared region.
  const SharedRegion* region() const { return region_.valid() ? &region_ : nullptr; }

  void AddContext(engine::ContextId id, const store::ModelShape& shape);
  std::optional<store::ModelShape> Shape(engine::ContextId id) const;
  bool RemoveContext(engine::ContextId id);
  std::vector<engine::ContextId> TakeContexts();
  size_t context_count() const;

 private:
  const uint64_t id_;
  const bool local_;
  bool hello_done_ = false;
  SharedRegion region_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<engine::ContextId, store::ModelShape> contexts_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvwave::rpc

#endif  // KVWAVE_RPC_SESSION_H_
