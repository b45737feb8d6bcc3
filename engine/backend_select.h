// Builds an engine's dependencies (engine/engine.h, EngineDeps) from the settings, for the daemon
// and the benchmarks: the attention backend and the host memory of the KV.
//
//   gpu.mode = off   the CPU backend.
//   gpu.mode = auto  the CUDA backend when kvwaved is built with CUDA, a device is present and
//                    the backend starts; otherwise the CPU backend (the reason is logged).
//   gpu.mode = on    the CUDA backend, or FAILED_PRECONDITION saying why not (built without CUDA,
//                    no device, or the backend failed to start).
//   store.pinned_memory: the host pool sits on pinned, GPU-mapped memory (buffer/
//                    pinned_allocator.h) when auto and a device is present, or on; `on` without
//                    a device is FAILED_PRECONDITION. Otherwise on store::MappedHostAllocator().
//
// Thread-safety: stateless.
#ifndef KVWAVE_ENGINE_BACKEND_SELECT_H_
#define KVWAVE_ENGINE_BACKEND_SELECT_H_

#include <string>

#include "absl/status/statusor.h"
#include "config/settings.h"
#include "engine/engine.h"

namespace kvwave::engine {

struct SelectedDeps {
  EngineDeps deps;
  std::string description;  // one line for the start-up log: backend and host memory
};

[[nodiscard]] absl::StatusOr<SelectedDeps> SelectEngineDeps(const config::Settings& settings);

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_BACKEND_SELECT_H_
