// The per-(layer, KV head) operations behind Engine: sealing a tail prefix into a segment,
// tripartite attention, index-guided retrieval and gathering rows by position.
//
// Every function works on one store::HeadKv whose layer lock the caller holds (exclusive for
// SealHead, shared for the others). Stateless; thread-safe across different heads.
#ifndef KVWAVE_ENGINE_HEAD_OPS_H_
#define KVWAVE_ENGINE_HEAD_OPS_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "config/settings.h"
#include "engine/engine.h"
#include "index/graph_index.h"
#include "index/wave_index.h"
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
  // attend.rank: two_pass re-ranks the top ceil(rank_overfetch x r) clusters by centroid by
  // their best member key (the largest q.k over the group's heads and the cluster's members).
  bool two_pass = false;
  double rank_overfetch = 2.0;
  // attend.estimation_spread: the estimation zone counts each cluster's key spread.
  bool estimation_spread = false;
  store::HostAllocator* allocator = nullptr;
  AttentionBackend* backend = nullptr;  // runs the k-means of SealHead; null: the CPU kernel
  // index.graph = on: SealHead builds the segment's graph from the queries held (graph_ops.h).
  bool graph = false;
  index::GraphIndexOptions graph_options;
};

// Parameters of the contexts of `shape` under `settings`; allocator: where segments go.
HeadParams MakeHeadParams(const config::Settings& settings, const store::ModelShape& shape,
                          store::HostAllocator* allocator);

// A seal in steps, so that the k-means runs with no lock held (engine/engine_impl.cc):
//   PrepareSeal (layer lock shared)  the first n tail keys to float32
//   ClusterSeal (no lock)            the k-means (p.backend->ClusterKeys)
//   BuildSeal   (layer lock shared)  the rows laid out cluster-contiguous into plan.segment
// then the caller publishes (lock exclusive): segments.push_back, tail.DropFront(n). Between the
// steps the tail may grow, but its first n tokens stay (only the publisher drops them).
struct SealPlan {
  int64_t first_position = 0;
  int64_t tokens = 0;
  int32_t steady = 0;
  std::vector<float> keys;  // [tokens - steady x d]
  index::WaveClusters clusters;
  std::shared_ptr<const store::Segment> segment;
  // RetrievalAttention (engine/graph_ops.h): the held prefill queries of the n tokens (copied by
  // PrepareSeal when p.graph and all are held), and the graph GraphSeal builds from them.
  std::vector<float> queries;
  std::shared_ptr<const index::GraphIndex> graph;
};
void PrepareSeal(const HeadParams& p, int64_t n, const store::HeadKv& head, SealPlan& plan);
[[nodiscard]] absl::Status ClusterSeal(const HeadParams& p, SealPlan& plan);
[[nodiscard]] absl::Status BuildSeal(const HeadParams& p, const store::HeadKv& head, SealPlan& plan,
                                     store::MemoryCharge& reserved);

// All the steps at once, and the publication. Seals the first n tokens of head.tail into a new
// segment (clustered with the wave index), charging it to `reserved`. On error the head is
// unchanged.
[[nodiscard]] absl::Status SealHead(const HeadParams& p, int64_t n, store::HeadKv& head,
                                    store::MemoryCharge& reserved);

// Tripartite attention of the group's query heads q [group x d]; out [group x d], lse [group].
// Ranking: the clusters by centroid (GroupSoftmaxSum of q.c); with p.two_pass, the top
// m = gpu::TwoPassCandidates(r, p.rank_overfetch) of them are re-ranked by their best member key
// and retrieved in that order, at most r, each while its keys fit in the keys of the centroid
// ranking's top r (so it never attends more keys exactly than the centroid ranking would, and
// takes at least one cluster); the r slots this leaves empty go to the estimation zone,
// which takes the next clusters in centroid order. The m clusters' member keys scored add to
// stats->scored_tokens.
[[nodiscard]] absl::Status AttendHead(const HeadParams& p, const store::HeadKv& head,
                                      const float* q, const AttendBudget& budget, float* out,
                                      float* lse, AttendStats* stats);

// Top-k positions (and scores q.k/sqrt(d)) per query head of the group; positions and scores are
// [group x k]. Adds the keys scored to stats.
[[nodiscard]] absl::Status RetrieveHead(const HeadParams& p, const store::HeadKv& head,
                                        const float* q, const RetrieveOptions& options,
                                        int64_t* positions, float* scores, RetrieveStats* stats);

// Makes the rows of `positions` resident (the clusters of remote-attached segments that hold
// them, fetched in one batch: store/pending_rows.h); OK at once when they are.
[[nodiscard]] absl::Status EnsureRowsAt(const store::HeadKv& head,
                                        std::span<const int64_t> positions);

// Copies the key and value rows of `position` into k_out, v_out (one row each). Fails only when
// the row belongs to a remote-attached segment whose rows cannot be fetched
// (store/pending_rows.h EnsureClusters: DataLoss or Unavailable).
// REQUIRES: 0 <= position < tokens held by the head.
[[nodiscard]] absl::Status GatherRow(const store::HeadKv& head, int64_t position, size_t row_bytes,
                                     std::byte* k_out, std::byte* v_out);

// Upper bound of the bytes one SealHead of n tokens may charge.
int64_t SealReserveBytes(const HeadParams& p, int64_t n);

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_HEAD_OPS_H_
