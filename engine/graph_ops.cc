#include "engine/graph_ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "config/status_macros.h"
#include "engine/attention_backend.h"
#include "gpu/attention_cpu.h"
#include "index/distance.h"
#include "index/graph_codec.h"
#include "spdlog/spdlog.h"

namespace kvwave::engine {
namespace {

// The best (score, position) pairs seen for one query head; ties rank the lower position first.
class Best {
 public:
  void Add(float score, int64_t position) { items_.emplace_back(score, position); }
  void Emit(int32_t k, int64_t* positions, float* scores) {
    const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(items_.size()));
    std::partial_sort(items_.begin(), items_.begin() + m, items_.end(),
                      [](const auto& a, const auto& b) {
                        return a.first > b.first || (a.first == b.first && a.second < b.second);
                      });
    for (int64_t i = 0; i < k; ++i) {
      positions[i] = i < m ? items_[i].second : -1;
      scores[i] = i < m ? items_[i].first : -std::numeric_limits<float>::infinity();
    }
  }

 private:
  std::vector<std::pair<float, int64_t>> items_;
};

// Scores `rows` consecutive key rows exactly for every query head; position_of_row(r) < 0 skips
// a row (padding).
void ScoreExactly(const HeadParams& p, const float* q, float scale, const std::byte* k0,
                  int64_t rows, const auto& position_of_row, std::vector<Best>& best,
                  std::vector<float>& buf, int64_t& scored) {
  if (rows <= 0) return;
  buf.resize(static_cast<size_t>(rows * p.head_dim + p.group * rows));
  float* keys = buf.data();
  float* dots = keys + rows * p.head_dim;
  ToFloat(k0, p.dtype, keys, static_cast<size_t>(rows * p.head_dim));
  index::DotRowsMulti(q, p.group, keys, rows, p.head_dim, dots);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = position_of_row(r);
    if (pos < 0) continue;
    for (int h = 0; h < p.group; ++h) best[h].Add(dots[h * rows + r] * scale, pos);
  }
  scored += rows;
}

}  // namespace

std::vector<float> SegmentKeysInTokenOrder(const store::Segment& segment) {
  const int d = segment.head_dim();
  std::vector<float> keys(static_cast<size_t>(segment.num_tokens()) * d);
  for (int32_t t = 0; t < segment.num_tokens(); ++t) {
    ToFloat(segment.key_row(segment.row_of_token(t)), segment.dtype(),
            keys.data() + static_cast<size_t>(t) * d, static_cast<size_t>(d));
  }
  return keys;
}

absl::StatusOr<std::shared_ptr<const index::GraphIndex>> BuildSegmentGraph(
    const store::Segment& segment, std::span<const float> queries,
    const index::GraphIndexOptions& options) {
  const int d = segment.head_dim();
  if (queries.empty() || queries.size() % static_cast<size_t>(d) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("graph of a segment: ", queries.size(), " query floats for head_dim ", d));
  }
  const std::vector<float> keys = SegmentKeysInTokenOrder(segment);
  KVWAVE_ASSIGN_OR_RETURN(
      index::GraphIndex graph,
      index::GraphIndex::Build(keys.data(), segment.num_tokens(), queries.data(),
                               static_cast<int64_t>(queries.size() / d), d, options));
  return std::make_shared<const index::GraphIndex>(std::move(graph));
}

void PrepareSealQueries(const HeadParams& p, int64_t n, const store::HeadKv& head, SealPlan& plan) {
  plan.queries.clear();
  if (!p.graph || head.query_tokens < n) return;
  const size_t floats = static_cast<size_t>(n) * p.group * p.head_dim;
  plan.queries.assign(head.queries.begin(), head.queries.begin() + floats);
}

void GraphSeal(const HeadParams& p, SealPlan& plan) {
  plan.graph = nullptr;
  if (plan.queries.empty() || plan.segment == nullptr) return;
  index::GraphIndexOptions options = p.graph_options;
  if (p.backend != nullptr) {
    options.exact_topn = [backend = p.backend](const float* keys, int64_t n, const float* queries,
                                               int64_t m, int d, int nn, int32_t* out) {
      return backend->ExactTopN(keys, n, queries, m, d, nn, out);
    };
  }
  auto built = BuildSegmentGraph(*plan.segment, plan.queries, options);
  if (built.ok()) {
    plan.graph = *std::move(built);
  } else {
    spdlog::error("segment at {}: graph not built ({}); it is scanned exactly", plan.first_position,
                  built.status().ToString());
  }
  plan.queries = {};
}

void PublishSegmentGraph(const HeadParams& p, SealPlan& plan, store::HeadKv& head) {
  const int64_t n = plan.tokens;
  if (plan.graph != nullptr) {
    // Published just now under the layer's exclusive lock: no reader has seen it yet, and no
    // prefix block holds it before OnLayerSealed, which runs after this.
    std::const_pointer_cast<store::Segment>(head.segments.back())->SetGraph(plan.graph);
  }
  const size_t row = static_cast<size_t>(p.group) * p.head_dim;  // floats per token
  head.graphs.resize(head.segments.size() - 1);  // earlier segments without one (e.g. attached)
  head.graphs.push_back(std::move(plan.graph));
  const int64_t used = std::min(n, head.query_tokens);
  head.queries.erase(head.queries.begin(), head.queries.begin() + used * row);
  head.query_tokens -= used;
  head.query_charge.Shrink(std::min<int64_t>(head.query_charge.bytes(),
                                             used * static_cast<int64_t>(row * sizeof(float))));
}

namespace {

absl::Status CheckGraphs(const HeadParams& p, const store::HeadKv& head,
                         std::span<const std::shared_ptr<const index::GraphIndex>> graphs) {
  if (graphs.size() > head.segments.size()) {
    return absl::InvalidArgumentError(absl::StrCat("graph search: ", graphs.size(), " graphs for ",
                                                   head.segments.size(), " segments"));
  }
  for (size_t s = 0; s < graphs.size(); ++s) {
    if (graphs[s] != nullptr &&
        (graphs[s]->size() != head.segments[s]->num_tokens() || graphs[s]->dim() != p.head_dim)) {
      return absl::InvalidArgumentError("graph search: a graph does not match its segment");
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string EncodeSegmentGraph(const store::Segment& segment) {
  return segment.graph() == nullptr ? std::string()
                                    : index::EncodeGraph(segment.graph()->ToParts());
}

absl::Status DecodeSegmentGraph(store::Segment& segment, absl::string_view record,
                                store::MemoryBudget& budget) {
  KVWAVE_ASSIGN_OR_RETURN(index::GraphParts parts, index::DecodeGraph(record));
  const std::vector<float> keys = SegmentKeysInTokenOrder(segment);
  absl::StatusOr<index::GraphIndex> graph = index::GraphIndex::FromParts(
      keys.data(), segment.num_tokens(), segment.head_dim(), std::move(parts));
  if (!graph.ok()) {
    return absl::DataLossError(
        absl::StrCat("graph record does not fit its segment: ", graph.status().message()));
  }
  KVWAVE_ASSIGN_OR_RETURN(store::MemoryCharge charge, budget.Reserve(graph->MemoryBytes()));
  segment.SetGraph(
      WithCharge(std::make_shared<const index::GraphIndex>(*std::move(graph)), std::move(charge)));
  return absl::OkStatus();
}

std::shared_ptr<const index::GraphIndex> WithCharge(std::shared_ptr<const index::GraphIndex> graph,
                                                    store::MemoryCharge charge) {
  struct Held {
    std::shared_ptr<const index::GraphIndex> graph;
    store::MemoryCharge charge;
  };
  auto held = std::make_shared<Held>(Held{std::move(graph), std::move(charge)});
  const index::GraphIndex* raw = held->graph.get();
  return std::shared_ptr<const index::GraphIndex>(std::move(held), raw);
}

absl::Status AttendGraphRetrievedHead(
    const HeadParams& p, const store::HeadKv& head,
    std::span<const std::shared_ptr<const index::GraphIndex>> graphs, const float* q, int32_t top_k,
    int32_t beam, float* out, float* lse, AttendStats* stats) {
  if (top_k < 1) return absl::InvalidArgumentError("graph attention: top_k < 1");
  KVWAVE_RETURN_IF_ERROR(CheckGraphs(p, head, graphs));
  const int g = p.group;
  const int d = p.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Exact for every head: the clusters of segments without a graph.
  std::vector<gpu::cpu::KvSpan> exact;
  int64_t exact_tokens = 0;
  for (size_t s = 0; s < head.segments.size(); ++s) {
    if (s < graphs.size() && graphs[s] != nullptr) continue;
    const store::Segment& seg = *head.segments[s];
    KVWAVE_RETURN_IF_ERROR(store::EnsureAllRows(seg));  // a remote-attached block's rows
    for (int32_t c = 0; c < seg.num_clusters(); ++c) {
      const int64_t row = seg.cluster_row(c);
      exact.push_back({seg.key_row(row), seg.value_row(row), seg.cluster_size(c)});
      exact_tokens += seg.cluster_size(c);
    }
  }
  KVWAVE_RETURN_IF_ERROR(gpu::cpu::ExactAttention(q, g, d, scale, p.dtype, exact, out, lse));
  // Per query head: the graphs' best top_k tokens, attended exactly and merged.
  struct Hit {
    float score;
    int32_t segment;
    int32_t token;
  };
  std::vector<Hit> hits;
  std::vector<gpu::cpu::KvSpan> chosen;
  std::vector<float> part_out(static_cast<size_t>(d));
  float part_lse = 0;
  int64_t graph_tokens = 0, scanned = 0;
  index::GraphSearchScratch scratch;
  for (int h = 0; h < g; ++h) {
    const float* qh = q + static_cast<int64_t>(h) * d;
    hits.clear();
    for (size_t s = 0; s < graphs.size(); ++s) {
      if (graphs[s] == nullptr) continue;
      const store::Segment& seg = *head.segments[s];
      const index::GraphSearchResult r =
          graphs[s]->Search(qh, top_k, std::max(beam, top_k), &scratch);
      scanned += r.scanned;
      for (size_t i = 0; i < r.ids.size(); ++i) {
        if (r.ids[i] < seg.steady_tokens()) continue;  // in the steady zone already
        hits.push_back({r.scores[i], static_cast<int32_t>(s), r.ids[i]});
      }
    }
    const size_t keep = std::min(hits.size(), static_cast<size_t>(top_k));
    std::partial_sort(hits.begin(), hits.begin() + keep, hits.end(),
                      [](const Hit& a, const Hit& b) { return a.score > b.score; });
    chosen.clear();
    for (size_t i = 0; i < keep; ++i) {
      const store::Segment& seg = *head.segments[hits[i].segment];
      const int64_t row = seg.row_of_token(hits[i].token);
      chosen.push_back({seg.key_row(row), seg.value_row(row), 1});
    }
    graph_tokens += static_cast<int64_t>(keep);
    if (chosen.empty()) continue;
    KVWAVE_RETURN_IF_ERROR(
        gpu::cpu::ExactAttention(qh, 1, d, scale, p.dtype, chosen, part_out.data(), &part_lse));
    gpu::cpu::MergeLse(out + static_cast<int64_t>(h) * d, lse + h, part_out.data(), &part_lse, 1,
                       d);
  }
  if (stats != nullptr) {
    stats->retrieved_tokens += graph_tokens + exact_tokens;
    stats->graph_keys_scored += scanned;
  }
  return absl::OkStatus();
}

absl::Status AttendGraphHead(const HeadParams& p, const store::HeadKv& head,
                             std::span<const std::shared_ptr<const index::GraphIndex>> graphs,
                             const float* q, int32_t top_k, int32_t beam, float* out, float* lse,
                             AttendStats* stats) {
  if (top_k < 1) return absl::InvalidArgumentError("graph attention: top_k < 1");
  KVWAVE_RETURN_IF_ERROR(CheckGraphs(p, head, graphs));
  const int g = p.group;
  const int d = p.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // The steady zone exactly: the sinks and the tail.
  std::vector<gpu::cpu::KvSpan> steady;
  int64_t steady_tokens = 0;
  if (!head.segments.empty() && head.segments[0]->steady_tokens() > 0) {
    const store::Segment& first = *head.segments[0];
    steady.push_back({first.key_row(0), first.value_row(0), first.steady_tokens()});
    steady_tokens += first.steady_tokens();
  }
  if (head.tail.size() > 0) {
    steady.push_back({head.tail.key_row(0), head.tail.value_row(0), head.tail.size()});
    steady_tokens += head.tail.size();
  }
  KVWAVE_RETURN_IF_ERROR(gpu::cpu::ExactAttention(q, g, d, scale, p.dtype, steady, out, lse));
  std::vector<float> part_out(static_cast<size_t>(g) * d), part_lse(static_cast<size_t>(g));
  KVWAVE_RETURN_IF_ERROR(AttendGraphRetrievedHead(p, head, graphs, q, top_k, beam, part_out.data(),
                                                  part_lse.data(), stats));
  gpu::cpu::MergeLse(out, lse, part_out.data(), part_lse.data(), g, d);
  if (stats != nullptr) stats->steady_tokens += steady_tokens;
  return absl::OkStatus();
}

absl::Status RetrieveGraphHead(const HeadParams& p, const store::HeadKv& head,
                               std::span<const std::shared_ptr<const index::GraphIndex>> graphs,
                               const float* q, int32_t k, int32_t beam, int64_t* positions,
                               float* scores, RetrieveStats* stats) {
  if (k < 1) return absl::InvalidArgumentError("graph retrieval: k < 1");
  KVWAVE_RETURN_IF_ERROR(CheckGraphs(p, head, graphs));
  const float scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  std::vector<Best> best(static_cast<size_t>(p.group));
  std::vector<float> buf;
  int64_t scored = 0, graph_scanned = 0, total = head.tail.size();  // scored: rows, all heads
  const int64_t tail0 = head.tail.first_position();
  ScoreExactly(
      p, q, scale, head.tail.key_row(0), head.tail.size(), [tail0](int64_t r) { return tail0 + r; },
      best, buf, scored);
  index::GraphSearchScratch scratch;
  for (size_t s = 0; s < head.segments.size(); ++s) {
    const store::Segment& seg = *head.segments[s];
    total += seg.num_tokens();
    const auto position_of_row = [&seg](int64_t r) -> int64_t {
      const int32_t t = seg.token_of_row(r);
      return t < 0 ? -1 : seg.first_position() + t;
    };
    // The sinks (steady rows, first in the segment) are always scored exactly.
    ScoreExactly(p, q, scale, seg.key_row(0), seg.steady_tokens(), position_of_row, best, buf,
                 scored);
    const index::GraphIndex* graph = s < graphs.size() ? graphs[s].get() : nullptr;
    if (graph == nullptr) {
      KVWAVE_RETURN_IF_ERROR(store::EnsureAllRows(seg));
      ScoreExactly(
          p, q, scale, seg.key_row(seg.steady_tokens()), seg.num_rows() - seg.steady_tokens(),
          [&](int64_t r) { return position_of_row(r + seg.steady_tokens()); }, best, buf, scored);
      continue;
    }
    for (int h = 0; h < p.group; ++h) {
      const index::GraphSearchResult r =
          graph->Search(q + static_cast<int64_t>(h) * p.head_dim, k, std::max(beam, k), &scratch);
      graph_scanned += r.scanned;
      for (size_t i = 0; i < r.ids.size(); ++i) {
        if (r.ids[i] < seg.steady_tokens()) continue;  // scored exactly above
        best[h].Add(r.scores[i] * scale, seg.first_position() + r.ids[i]);
      }
    }
  }
  for (int h = 0; h < p.group; ++h) best[h].Emit(k, positions + h * k, scores + h * k);
  if (stats != nullptr) {
    // An exact row is scored for every query head of the group; a search counts its own keys.
    stats->keys_scored += scored * p.group + graph_scanned;
    stats->keys_total += total * p.group;
  }
  return absl::OkStatus();
}

}  // namespace kvwave::engine
