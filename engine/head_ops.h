// The per-(layer, KV head) operations behind Engine: sealing a tail prefix into a segment,
// tripartite attention, index-guided retrieval and gathering rows by position.
//
// Every function works on one store::HeadKv whose layer lock the caller holds (exclusive for
// SealHead, shared for the others). Stateless; thread-safe across different heads.
#ifndef KVWAVE_ENGINE_HEAD_OPS_H_
#define KVWAVE_ENGINE_HEAD_OPS_H_

#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "config/settings.h"
#include "engine/engine.h"
#include "store/context.h"

namespace kvwave::engine {

class AttentionBackend;  // engine/attention_backend.h

struct HeadParams {
  int32_t head_dim = 0;
  DType dtype = DType::kF32;
  int32_t group = 1;  // query heads per KV head
  int32_t page_tokens = 8;
  int32_t sink_tokens = 4;
  int32_t tokens_per_cluster = 16;
  int32_t kmeans_iterations = 10;
  bool faiss_kmeans = false;
  store::HostAllocator* allocator = nullptr;
  AttentionBackend* backend = nullptr;  // runs the k-means of SealHead; null: the CPU kernel
};

// Parameters of the contexts of `shape` under `settings`; allocator: where segments go.
HeadParams MakeHeadParams(const config::Settings& settings, const store::ModelShape& shape,
                          store::HostAllocator* allocator);

// Seals the first n tokens of head.tail into a new segment (clustered with the wave index),
// charging it to `reserved`. On error the head is unchanged.
[[nodiscard]] absl::Status SealHead(const HeadParams& p, int64_t n, store::HeadKv& head,
                                    store::MemoryCharge& reserved);

// Tripartite attention of the group's query heads q [group x d]; out [group x d], lse [group].
[[nodiscard]] absl::Status AttendHead(const HeadParams& p, const store::HeadKv& head,
                                      const float* q, const AttendBudget& budget, float* out,
                                      float* lse, AttendStats* stats);

// Top-k positions (and scores q.k/sqrt(d)) per query head of the group; positions and scores are
// [group x k]. Adds the keys scored to stats.
[[nodiscard]] absl::Status RetrieveHead(const HeadParams& p, const store::HeadKv& head,
                                        const float* q, const RetrieveOptions& options,
                                        int64_t* positions, float* scores, RetrieveStats* stats);

// Copies the key and value rows of `position` into k_out, v_out (one row each).
// REQUIRES: 0 <= position < tokens held by the head.
void GatherRow(const store::HeadKv& head, int64_t position, size_t row_bytes, std::byte* k_out,
               std::byte* v_out);

// Upper bound of the bytes one SealHead of n tokens may charge.
int64_t SealReserveBytes(const HeadParams& p, int64_t n);

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_HEAD_OPS_H_
