// The attention backend: the seam between the engine (contexts, locking, memory, sealing,
// prefixes) and the hardware that computes Attend. The engine is given one at Create
// (EngineDeps, engine/engine.h); there are two:
//   - the CPU backend (engine/cpu_backend.h): today's kernels (engine/head_ops.h, gpu/
//     attention_cpu.h), stateless; what CI runs and the reference for the other;
//   - the CUDA backend (engine/cuda/, CUDA builds only): the wave buffer — a GPU meta index per
//     sealed segment, a resident steady zone per (context, layer, KV head), one page pool and one
//     LRU across all contexts.
// engine/backend_select.h picks one from the settings (gpu.mode) for the daemon and benchmarks.
//
// What the backend sees. A unit is one (context, layer, KV head); its tokens are
//   [sealed segments, in position order][tail: every token not yet in a published segment]
// (store/context.h). The steady zone is the first segment's steady (sink) rows plus the WHOLE
// tail — which includes tokens a background seal is indexing until that seal is published — and
// is always attended exactly. Segments are immutable and named by
// store::Segment::id() (unique in the process, never reused): a prefix block attached by several
// contexts is the same Segment object, with one id, in each of their units, so a cache keyed on
// it holds it once. Its host rows live (pinned and mapped when the engine's host pool sits on
// the pinned allocator) until the last shared_ptr goes; a backend that keeps a shared_ptr keeps
// them and their memory charge alive, so a backend drops its references on OnClose.
//
// Lifecycle events, in order for one context:
//   OnOpen                 once, before any other call on the context; its heads may already
//                          hold segments (an attached shared prefix) and tails that start after
//                          them.
//   OnAppend(layer, n)     after n tokens were appended to every KV head's tail of `layer`: they
//                          are the last n rows of each tail. Called for every Append (a decode
//                          step appends n = 1 per layer).
//   OnPublish(layer, c)    after a seal was published: each KV head of `layer` has c new
//                          segments at the back of its list, and the tokens they hold have left
//                          the front of its tail (one step: an Attend sees both or neither).
//   OnClose                once, after the context left the engine's table and every call and
//                          seal on it finished; nothing on it follows. Segments it shares with
//                          other open contexts stay theirs.
// OnAppend and OnPublish run with the layer's lock held exclusively (no Attend of that layer
// runs meanwhile): host rows passed or reachable through the context are valid only until the
// event returns (a later Append may move the tail, a publish drops its front), so a copy queued
// from them must complete, or be staged, before returning. Events of different layers or
// contexts run concurrently, and concurrently with Attends of other layers and contexts.
// An error from an event is not returned to the client: the engine logs it and the backend must
// still answer Attend correctly (e.g. by reading host memory), or fail that Attend.
//
// Attend. The engine resolves contexts, checks every argument (shapes, budgets, finiteness), and
// holds each item's layer lock shared for the whole call; the backend computes (out, lse) of
// each item's query heads over its units and adds its counts to the item's stats. One call may
// carry several items (AttendBatch: different contexts, one layer, lengths that differ); the
// CPU backend loops over them, the CUDA backend runs one pipeline. Items never name the same
// (context, layer) twice. Budgets come with each item (fractions of ALL the unit's clusters,
// sized by gpu::SizeZones, gpu/budget.h). A 100% retrieval budget must equal exact attention.
//
// Indexing. ClusterKeys runs the k-means of a segment being sealed (spherical k-means of the
// wave index, index/wave_index.h) on a background seal thread; the default runs the CPU kernel.
// The CUDA backend may run it on the GPU (CudaBackend::SphericalKMeans).
//
// Thread-safety: all methods may be called from several threads at once (Attends of the same
// (context, layer) included); the engine only guarantees the ordering above. Streams, events
// and scratch belong to the backend instance (never to a process-wide global): two engines in
// one process each have their own backend.
#ifndef KVWAVE_ENGINE_ATTENTION_BACKEND_H_
#define KVWAVE_ENGINE_ATTENTION_BACKEND_H_

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "engine/engine.h"
#include "index/exact_topn.h"
#include "index/wave_index.h"
#include "store/context.h"

namespace kvwave::engine {

// One (context, layer) of an Attend call.
struct AttendItem {
  const store::Context* context = nullptr;  // context->id(), ->shape()
  int32_t layer = 0;
  AttendBudget budget;
  std::span<const float> q;      // [q_heads x head_dim]; query head j reads KV head j / group
  std::span<float> out;          // [q_heads x head_dim]
  std::span<float> lse;          // [q_heads]
  AttendStats* stats = nullptr;  // never null: add this item's counts to it
};

// One (context, layer) of an AttendDevice call (issue 17): its q [q_heads x head_dim], out
// [q_heads x head_dim] and lse [q_heads] (float32) at these byte offsets of the registration's
// buffers (checked by the engine: in range, multiples of 16).
struct DeviceAttendItem {
  const store::Context* context = nullptr;
  int32_t layer = 0;
  AttendBudget budget;
  DeviceOffsets offsets;
  AttendStats* stats = nullptr;  // never null
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  virtual const char* name() const = 0;

  // Whether Attend copes with segments whose rows are pending (store/pending_rows.h: a
  // remote-attached block under remote.attach = index) by making the clusters it reads resident
  // first (store::EnsureClusters). A backend that answers false only ever sees whole segments:
  // the engine attaches remote blocks whole for it.
  virtual bool reads_pending_rows() const { return false; }

  // Lifecycle events (see the header comment for when each runs and what it may read).
  virtual absl::Status OnOpen(const store::Context& ctx) { return absl::OkStatus(); }
  virtual absl::Status OnAppend(const store::Context& ctx, int32_t layer, int64_t n) {
    return absl::OkStatus();
  }
  virtual absl::Status OnPublish(const store::Context& ctx, int32_t layer, int32_t segments) {
    return absl::OkStatus();
  }
  virtual void OnClose(const store::Context& ctx) {}

  // (out, lse) of every item; see the header comment. On error the outputs are unspecified.
  [[nodiscard]] virtual absl::Status Attend(std::span<const AttendItem> items) = 0;

  // GPU clients (issue 17), see Engine::OpenDeviceBuffers / AttendBatchDevice. `buffers` is one
  // this backend opened; the engine checked the offsets against its sizes and holds the items'
  // layer locks (shared) for the call. Default: no GPU.
  [[nodiscard]] virtual absl::StatusOr<std::unique_ptr<DeviceBuffers>> OpenDeviceBuffers(
      const DeviceBuffersSpec& spec) {
    return absl::FailedPreconditionError(
        "no GPU backend: this kvwaved attends on the CPU (gpu.mode), device tensors need a GPU");
  }
  [[nodiscard]] virtual absl::Status AttendDevice(std::span<const DeviceAttendItem> items,
                                                  DeviceBuffers& buffers) {
    return absl::FailedPreconditionError("no GPU backend");
  }

  // The clustering of one segment's keys [n x d] (float32). Default: index::ClusterKeys.
  [[nodiscard]] virtual absl::StatusOr<index::WaveClusters> ClusterKeys(
      const float* keys, int64_t n, int32_t d, const index::WaveIndexOptions& options) {
    return index::ClusterKeys(keys, n, d, options);
  }

  // The graph build's exact top-N (index::ExactTopN's contract and answer, bit for bit): the
  // CUDA backend runs it on the GPU. Default: the CPU kernel.
  [[nodiscard]] virtual absl::Status ExactTopN(const float* keys, int64_t n, const float* queries,
                                               int64_t m, int d, int nn, int32_t* out) {
    return index::ExactTopN(keys, n, queries, m, d, nn, out);
  }

  virtual BackendStats Stats() const { return BackendStats{}; }
};

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_ATTENTION_BACKEND_H_
