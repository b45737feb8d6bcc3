// RetrievalAttention's graph beside the wave index, per sealed segment of one (layer, KV head):
// building it from the segment's keys and the prefill queries of the same tokens, and the graph
// retrieval of one head (issue 19). The engine calls these: AppendWithQueries holds the queries
// (store::HeadKv), the background seal builds a segment's graph beside its wave index, and
// Retrieve with RetrieveMethod::kGraph searches them (settings index.graph*).
//
// A segment's graph is over all its tokens in token order (graph id t = the segment's token t,
// position first_position + t; sinks included), built exactly as `kvwave-bench retrieval` builds
// it (index::GraphIndex::Build on float32 keys and the same options and seed), so the two agree.
//
// Thread-safety: stateless functions; a built graph is immutable and may be searched from many
// threads. RetrieveGraphHead needs the head's layer lock held shared, like RetrieveHead.
#ifndef KVWAVE_ENGINE_GRAPH_OPS_H_
#define KVWAVE_ENGINE_GRAPH_OPS_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/head_ops.h"
#include "index/graph_index.h"
#include "store/segment.h"

namespace kvwave::engine {

// Keys of the segment's tokens [0, num_tokens) in token order, as float32 [num_tokens x d].
std::vector<float> SegmentKeysInTokenOrder(const store::Segment& segment);

// Builds the segment's graph from `queries` [m x head_dim] float32: prefill queries of the
// segment's tokens (any of the KV group's query heads, any order; Build samples
// options.max_queries of them). Errors: no queries, m * head_dim != queries.size(), bad options.
[[nodiscard]] absl::StatusOr<std::shared_ptr<const index::GraphIndex>> BuildSegmentGraph(
    const store::Segment& segment, std::span<const float> queries,
    const index::GraphIndexOptions& options);

// The graph's part of a seal (engine/head_ops.h SealPlan), beside the wave index's:
//   PrepareSealQueries (layer lock shared): with p.graph and the queries of the n tokens held,
//     copies them into plan.queries;
//   GraphSeal (no lock, after BuildSeal): builds plan.graph from them (a failed build leaves
//     none: that segment is then scanned exactly);
//   PublishSegmentGraph (exclusive, right after the segment is pushed): records plan.graph for
//     it and releases the held queries of its n tokens (and their charge).
//   (PublishSegmentGraph first attaches plan.graph to plan.segment, Segment::SetGraph, so the
//   graph travels with the segment into prefix blocks and RocksDB.)
void PrepareSealQueries(const HeadParams& p, int64_t n, const store::HeadKv& head, SealPlan& plan);
void GraphSeal(const HeadParams& p, SealPlan& plan);
void PublishSegmentGraph(const HeadParams& p, SealPlan& plan, store::HeadKv& head);

// Top-k positions (and scores q.k / sqrt(d)) per query head of the group, like RetrieveHead:
// the tail and the first segment's sinks are scored exactly; a segment with a graph
// (graphs[i] for head.segments[i], non-null) by a beam search of queue max(beam, k); a segment
// without one by an exact scan. positions, scores: [group x k], best first, padded with -1 and
// -inf. Adds the keys scored to stats. Errors: graphs.size() > head.segments.size(), k < 1,
// a graph whose size differs from its segment's tokens. graphs may be shorter than the segments
// (the rest have none).
[[nodiscard]] absl::Status RetrieveGraphHead(
    const HeadParams& p, const store::HeadKv& head,
    std::span<const std::shared_ptr<const index::GraphIndex>> graphs, const float* q, int32_t k,
    int32_t beam, int64_t* positions, float* scores, RetrieveStats* stats);

// RetrievalAttention's attention of the group's query heads q [group x d] (AttendMethod::
// kRetrievalAttention): the steady zone (the first segment's sinks and the whole tail) and every
// segment without a graph exactly, for all heads at once; then per query head the best top_k
// tokens of the graphs' beam searches (queue max(beam, top_k) per segment, sinks excluded)
// exactly; the two merged by log-sum-exp. out [group x d], lse [group]. Adds to stats:
// steady_tokens (steady zone), retrieved_tokens (graph tokens over query heads, plus the tokens
// of graph-less segments), graph_keys_scored. Errors as RetrieveGraphHead, top_k < 1.
[[nodiscard]] absl::Status AttendGraphHead(
    const HeadParams& p, const store::HeadKv& head,
    std::span<const std::shared_ptr<const index::GraphIndex>> graphs, const float* q, int32_t top_k,
    int32_t beam, float* out, float* lse, AttendStats* stats);

// AttendGraphHead less the steady zone, for a caller that attends the steady zone elsewhere (the
// engine: through its backend — on the GPU with the CUDA one — while the graphs are searched
// here on the CPU threads, as RetrievalAttention splits the work): every segment without a
// graph exactly, then per query head the graphs' best top_k tokens (sinks excluded), merged. out
// [group x d], lse [group] (-inf and zeros for a head with nothing to attend). Adds
// retrieved_tokens and graph_keys_scored to stats. Errors as AttendGraphHead.
[[nodiscard]] absl::Status AttendGraphRetrievedHead(
    const HeadParams& p, const store::HeadKv& head,
    std::span<const std::shared_ptr<const index::GraphIndex>> graphs, const float* q, int32_t top_k,
    int32_t beam, float* out, float* lse, AttendStats* stats);

// The persistence tier's graph codec (store::PersistOptions::encode_graph / decode_graph):
// index/graph_codec.h's record of segment.graph(); decoding rebuilds the graph over the segment's
// keys (GraphIndex::FromParts checks it against them), charges its MemoryBytes to `budget` and
// attaches it. Errors: DataLoss for a bad record, ResourceExhausted at the limit.
std::string EncodeSegmentGraph(const store::Segment& segment);
[[nodiscard]] absl::Status DecodeSegmentGraph(store::Segment& segment, absl::string_view record,
                                              store::MemoryBudget& budget);

// The graph, holding `charge` (its MemoryBytes against the memory limit) for as long as it lives
// (it may be shared by several contexts through a prefix block).
std::shared_ptr<const index::GraphIndex> WithCharge(std::shared_ptr<const index::GraphIndex> graph,
                                                    store::MemoryCharge charge);

}  // namespace kvwave::engine

#endif  // KVWAVE_ENGINE_GRAPH_OPS_H_
