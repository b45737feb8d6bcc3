// Private parts of the wave buffer shared by wave_buffer.cc (calls, commits) and wave_space.cc
// (spaces, segment registration, Sync). Not for use outside buffer/.
#ifndef KVWAVE_BUFFER_WAVE_BUFFER_INTERNAL_H_
#define KVWAVE_BUFFER_WAVE_BUFFER_INTERNAL_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "buffer/wave_buffer.h"

namespace kvwave::buffer {

inline constexpr int kPageRows = gpu::kMaxPageRows;
inline constexpr int kComputeStream = 0;
// The cache updates (admission copies, table writes): each waits for the calls queued before it;
// a later call's selection and plan wait for it (its centroid logits do not).
inline constexpr int kUpdateStream = 1;
inline constexpr int kDoneEvent = 0;  // + slot: the slot's call is complete (stream C)
// After the slots' events: CallsEvent() marks the calls queued so far (C's tail, which an update
// waits for), UpdatesEvent() the updates queued so far (U's tail, which a call's plan waits for).

inline int64_t PagesOfRows(int64_t rows) { return (rows + kPageRows - 1) / kPageRows; }
inline size_t Align16(size_t x) { return (x + 15) & ~size_t{15}; }

// A segment held by at least one space: its cluster keys [key0, key0 + clusters) and page-table
// entries [entry0, entry0 + entries).
struct WaveBuffer::Registered {
  std::shared_ptr<const store::Segment> segment;
  int32_t key0 = 0, clusters = 0;
  int64_t entry0 = 0, entries = 0;
  int refs = 0;
};

// One layer of one context on the GPU.
struct WaveBuffer::Space {
  std::mutex mu;  // Sync + Enqueue of this space, one call at a time
  bool closed = false;
  // Per head: the segments joined (in order) and its cluster count; clusters_ = the largest (the
  // heads' arrays are padded to it with empty clusters).
  std::vector<std::vector<const store::Segment*>> joined;
  std::vector<int64_t> head_clusters, head_pages;
  int64_t clusters = 0, capacity = 0, max_cluster_pages = 0;
  // Meta index: [heads x capacity (x d)].
  gpu::DeviceBuffer centroids, centroids16, value_sums, sizes, keys;
  // Steady zone: sinks [heads x sink_cap rows], tail ring [heads x ring_cap rows], zones [heads].
  gpu::DeviceBuffer sink_k, sink_v, ring_k, ring_v, zones;
  int64_t sink_cap = 0, ring_cap = 0;
  int32_t sink_rows = 0;
  std::vector<gpu::SteadyZone> zone_host;  // as last uploaded
  bool zones_dirty = true;
};

// What End reports of one call of a batch.
struct WaveBuffer::CallRecord {
  int64_t steady_rows = 0;     // summed over the call's heads
  int64_t estimated = 0;       // estimation-zone clusters per head
  int64_t total_clusters = 0;  // summed over the call's heads
};

// One in-flight batch's resources (a batch: one or more calls, each of the buffer's `heads` KV
// heads; the launches see calls x heads heads, call i's at [i * heads, (i + 1) * heads)). Free
// when its owner and its commit job are done with it.
struct WaveBuffer::Slot {
  int index = 0;
  int holders = 0;  // under slot_mu_
  // Device: both zones' lists, counts, page list, execution buffer, q of host calls, the heads'
  // descriptors (gpu::HeadMeta).
  gpu::DeviceBuffer ret, est, counts, counts2, pages, page_counts, exec_k, exec_v, q, meta;
  // The device copy of `staging` (one DMA a batch; the gather kernel then reads device memory).
  gpu::DeviceBuffer staging_d;
  int64_t list_cap = 0, pages_cap = 0, exec_cap = 0, heads_cap = 0, offsets_for = -1,
          offsets_heads = -1;
  // Pinned host: the record (counts, retrieved rows, then (key, exec page) pairs), the update blob,
  // the staging of Sync's rows, the host call's q / out / lse (out, lse written there by the
  // kernels).
  store::HostBuffer record, update, staging, io;
  // The batch: its heads (calls x the buffer's heads); their retrieved lists in the record are
  // info_stride apart; planned: a record was written (else no call ranked any cluster).
  int64_t heads = 0;
  int64_t info_stride = 1;
  bool planned = false;
  std::vector<CallRecord> calls;
};

}  // namespace kvwave::buffer

#endif  // KVWAVE_BUFFER_WAVE_BUFFER_INTERNAL_H_
