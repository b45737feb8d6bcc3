// The CPU attention backend: tripartite attention per (layer, KV head) with the reference kernels
// (engine/head_ops.h over gpu/attention_cpu.h), the (item, KV head) pairs of a call spread over a
// oneTBB arena of attend.compute_threads. Keeps no per-context state: every event is a no-op, and
// the stats say "cpu" with zeros.
//
// Thread-safety: thread-safe (see engine/attention_backend.h).
#ifndef KVWAVE_ENGINE_CPU_BACKEND_H_
#define KVWAVE_ENGINE_CPU_BACKEND_H_

#include <memory>

#include "config/settings.h"
#include "engine/attention_backend.h"

namespace kvwave::engine {

std::unique_ptr<AttentionBackend> CreateCpuBackend(const config::Settings& settings);

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_CPU_BACKEND_H_
