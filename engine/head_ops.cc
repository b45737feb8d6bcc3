#include "engine/head_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "config/status_macros.h"
#include "engine/attention_backend.h"
#include "engine/graph_ops.h"
#include "gpu/attention_cpu.h"
#include "gpu/budget.h"
#include "index/distance.h"
#include "index/wave_index.h"

namespace kvwave::engine {
namespace {

using gpu::cpu::KvSpan;

// All clusters of a head's segments, numbered globally in segment order.
struct ClusterSet {
  std::vector<int64_t> base;  // [segments + 1], first global index of each segment
  int64_t total = 0;

  explicit ClusterSet(const store::HeadKv& head) {
    base.reserve(head.segments.size() + 1);
    for (const auto& seg : head.segments) {
      base.push_back(total);
      total += seg->num_clusters();
    }
    base.push_back(total);
  }
  // (segment index, local cluster) of global index g.
  std::pair<size_t, int32_t> Locate(int64_t g) const {
    size_t s = std::upper_bound(base.begin(), base.end(), g) - base.begin() - 1;
    return {s, static_cast<int32_t>(g - base[s])};
  }
};

// Ranking of the head's clusters for the group's queries (sum over the group of per-head softmax).
std::vector<float> RankClusters(const HeadParams& p, const store::HeadKv& head,
                                const ClusterSet& set, const float* q, float scale) {
  const int g = p.group;
  std::vector<float> logits(g * set.total), part, scores(set.total);
  std::vector<int32_t> sizes(set.total);
  for (size_t s = 0; s < head.segments.size(); ++s) {
    const store::Segment& seg = *head.segments[s];
    const int64_t c = seg.num_clusters();
    part.resize(g * c);
    gpu::cpu::CentroidLogits(q, g, p.head_dim, scale, seg.centroids().data(), c, part.data());
    for (int h = 0; h < g; ++h) {
      std::copy_n(part.data() + h * c, c, logits.data() + h * set.total + set.base[s]);
    }
    std::copy_n(seg.sizes().data(), c, sizes.data() + set.base[s]);
  }
  if (set.total > 0) {
    gpu::cpu::GroupSoftmaxSum(logits.data(), g, set.total, sizes.data(), scores.data());
  }
  return scores;
}

// Makes the rows of the listed global clusters resident (remote-attached segments fetch the
// missing ones, store/pending_rows.h); costs a pointer test per cluster otherwise.
absl::Status EnsureRanked(const store::HeadKv& head, const ClusterSet& set,
                          std::span<const int32_t> order) {
  std::vector<store::ClusterWant> wants;
  std::vector<int32_t> want_of(head.segments.size(), -1);
  for (int32_t g : order) {
    auto [s, c] = set.Locate(g);
    const store::Segment& seg = *head.segments[s];
    if (seg.rows_resident()) continue;
    if (want_of[s] < 0) {
      want_of[s] = static_cast<int32_t>(wants.size());
      wants.push_back({&seg, {}});
    }
    wants[want_of[s]].clusters.push_back(c);
  }
  if (wants.empty()) return absl::OkStatus();
  for (store::ClusterWant& w : wants) std::sort(w.clusters.begin(), w.clusters.end());
  return store::EnsureClusters(wants);
}

// Spans always attended exactly: the sinks of the first segment and the whole tail.
void SteadySpans(const store::HeadKv& head, std::vector<KvSpan>& spans, int64_t& tokens) {
  if (!head.segments.empty() && head.segments[0]->steady_tokens() > 0) {
    const store::Segment& first = *head.segments[0];
    spans.push_back({first.key_row(0), first.value_row(0), first.steady_tokens()});
    tokens += first.steady_tokens();
  }
  if (head.tail.size() > 0) {
    spans.push_back({head.tail.key_row(0), head.tail.value_row(0), head.tail.size()});
    tokens += head.tail.size();
  }
}

}  // namespace

HeadParams MakeHeadParams(const config::Settings& settings, const store::ModelShape& shape,
                          store::HostAllocator* allocator) {
  HeadParams p;
  p.head_dim = shape.head_dim;
  p.dtype = shape.dtype;
  p.group = shape.group();
  p.page_tokens = static_cast<int32_t>(settings.page_tokens);
  p.sink_tokens = static_cast<int32_t>(settings.sink_tokens);
  p.tokens_per_cluster = static_cast<int32_t>(settings.tokens_per_cluster);
  p.kmeans_iterations = static_cast<int32_t>(settings.kmeans_iterations);
  p.faiss_kmeans = settings.kmeans_kernel == "faiss";
  p.two_pass = settings.rank == "two_pass" || settings.rank == "auto";  // the CPU's auto
  p.rank_overfetch = settings.rank_overfetch;
  p.estimation_spread = settings.estimation_spread == "on";
  p.allocator = allocator;
  p.graph = settings.graph == "on";
  p.graph_options.max_queries = settings.graph_queries;
  p.graph_options.pivots_per_query = static_cast<int>(settings.graph_pivots);
  p.graph_options.max_degree = static_cast<int>(settings.graph_degree);
  return p;
}

int64_t SealReserveBytes(const HeadParams& p, int64_t n) {
  return store::Segment::MaxBytes(static_cast<int32_t>(n), p.head_dim, p.dtype, p.page_tokens,
                                  p.tokens_per_cluster);
}

void PrepareSeal(const HeadParams& p, int64_t n, const store::HeadKv& head, SealPlan& plan) {
  const store::Tail& tail = head.tail;
  KVWAVE_CHECK(n >= 1 && n <= tail.size());
  plan.first_position = tail.first_position();
  plan.tokens = n;
  plan.steady =
      tail.first_position() == 0 ? static_cast<int32_t>(std::min<int64_t>(p.sink_tokens, n)) : 0;
  const int64_t clustered = n - plan.steady;
  plan.keys.resize(clustered * p.head_dim);
  if (clustered > 0)
    ToFloat(tail.key_row(plan.steady), p.dtype, plan.keys.data(), plan.keys.size());
  PrepareSealQueries(p, n, head, plan);
}

absl::Status ClusterSeal(const HeadParams& p, SealPlan& plan) {
  const int64_t clustered = plan.tokens - plan.steady;
  if (clustered > 0) {
    index::WaveIndexOptions options;
    options.tokens_per_cluster = p.tokens_per_cluster;
    options.iterations = p.kmeans_iterations;
    options.kernel = p.faiss_kmeans ? index::WaveIndexOptions::Kernel::kFaiss
                                    : index::WaveIndexOptions::Kernel::kOwn;
    KVWAVE_ASSIGN_OR_RETURN(
        plan.clusters,
        p.backend != nullptr
            ? p.backend->ClusterKeys(plan.keys.data(), clustered, p.head_dim, options)
            : index::ClusterKeys(plan.keys.data(), clustered, p.head_dim, options));
  }
  plan.keys = {};
  return absl::OkStatus();
}

absl::Status BuildSeal(const HeadParams& p, const store::HeadKv& head, SealPlan& plan,
                       store::MemoryCharge& reserved) {
  const store::Tail& tail = head.tail;
  KVWAVE_CHECK(tail.first_position() == plan.first_position && tail.size() >= plan.tokens);
  store::SegmentInput in;
  in.first_position = plan.first_position;
  in.num_tokens = static_cast<int32_t>(plan.tokens);
  in.steady_tokens = plan.steady;
  in.head_dim = p.head_dim;
  in.dtype = p.dtype;
  in.page_tokens = p.page_tokens;
  in.keys = tail.key_row(0);
  in.values = tail.value_row(0);
  in.num_clusters = plan.clusters.num_clusters;
  in.assignment = plan.clusters.assignment;
  in.centroids = plan.clusters.centroids;
  in.sizes = plan.clusters.sizes;
  KVWAVE_ASSIGN_OR_RETURN(plan.segment, store::Segment::Build(in, p.allocator, reserved));
  plan.clusters = {};
  return absl::OkStatus();
}

absl::Status SealHead(const HeadParams& p, int64_t n, store::HeadKv& head,
                      store::MemoryCharge& reserved) {
  SealPlan plan;
  PrepareSeal(p, n, head, plan);
  KVWAVE_RETURN_IF_ERROR(ClusterSeal(p, plan));
  KVWAVE_RETURN_IF_ERROR(BuildSeal(p, head, plan, reserved));
  GraphSeal(p, plan);
  head.segments.push_back(std::move(plan.segment));
  PublishSegmentGraph(p, plan, head);
  head.tail.DropFront(n);  // the returned charge is released here
  return absl::OkStatus();
}

namespace {

// The best member key of each of the clusters order[0..m): the largest scale * q_h.k over the
// group's heads h and the cluster's members. Adds the keys scored to `scored`.
std::vector<float> BestMemberScores(const HeadParams& p, const store::HeadKv& head,
                                    const ClusterSet& set, const float* q, float scale,
                                    const int32_t* order, int64_t m, int64_t& scored) {
  std::vector<float> best(m, -std::numeric_limits<float>::infinity()), keys, dots;
  for (int64_t i = 0; i < m; ++i) {
    auto [s, c] = set.Locate(order[i]);
    const store::Segment& seg = *head.segments[s];
    const int64_t rows = seg.cluster_size(c);
    if (rows <= 0) continue;
    keys.resize(rows * p.head_dim);
    dots.resize(p.group * rows);
    ToFloat(seg.key_row(seg.cluster_row(c)), p.dtype, keys.data(), keys.size());
    index::DotRowsMulti(q, p.group, keys.data(), rows, p.head_dim, dots.data());
    best[i] = *std::max_element(dots.begin(), dots.end()) * scale;
    scored += rows;
  }
  return best;
}

}  // namespace

absl::Status AttendHead(const HeadParams& p, const store::HeadKv& head, const float* q,
                        const AttendBudget& budget, float* out, float* lse, AttendStats* stats) {
  const int g = p.group;
  const int d = p.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  ClusterSet set(head);
  std::vector<float> scores = RankClusters(p, head, set, q, scale);
  // Both zones are fractions of all the clusters (the one formula, shared with the GPU).
  const gpu::ZoneSizes zones = gpu::SizeZones(budget.retrieval, budget.estimation, set.total);
  const int64_t r = zones.retrieval;
  const int64_t e = zones.estimation;
  const int64_t m = p.two_pass ? gpu::TwoPassCandidates(r, p.rank_overfetch, set.total) : 0;
  const bool second_pass = m > r;
  std::vector<int32_t> order(std::max(r + e, m));
  const int64_t ranked = set.total > 0
                             ? gpu::cpu::TopK(scores.data(), set.total,
                                              static_cast<int64_t>(order.size()), order.data())
                             : 0;
  // chosen: the retrieved clusters (global indices); estimated: the next ones in centroid order.
  std::vector<int32_t> chosen, estimated;
  int64_t scored_tokens = 0;
  if (!second_pass) {
    chosen.assign(order.begin(), order.begin() + std::min(r, ranked));
  } else {
    const int64_t cand = std::min(m, ranked);
    // The candidates' member keys are read: resident first (remote-attached rows).
    KVWAVE_RETURN_IF_ERROR(EnsureRanked(head, set, std::span(order.data(), cand)));
    std::vector<float> best =
        BestMemberScores(p, head, set, q, scale, order.data(), cand, scored_tokens);
    // The keys the centroid ranking would retrieve: the re-ranked clusters may not exceed them.
    int64_t key_cap = 0;
    for (int64_t i = 0; i < std::min(r, cand); ++i) {
      auto [s, c] = set.Locate(order[i]);
      key_cap += head.segments[s]->cluster_size(c);
    }
    std::vector<int32_t> by_best(cand);  // candidate ranks, best member first (ties: centroid)
    for (int64_t i = 0; i < cand; ++i) by_best[i] = static_cast<int32_t>(i);
    std::stable_sort(by_best.begin(), by_best.end(),
                     [&](int32_t a, int32_t b) { return best[a] > best[b]; });
    std::vector<char> taken(cand, 0);
    int64_t keys = 0;
    // In that order, each cluster whose keys still fit (the centroid ranking's top r each fit, so
    // at least one is taken), at most r of them.
    for (int64_t j = 0; j < cand && static_cast<int64_t>(chosen.size()) < r; ++j) {
      auto [s, c] = set.Locate(order[by_best[j]]);
      const int64_t size = head.segments[s]->cluster_size(c);
      if (keys + size > key_cap) continue;
      keys += size;
      chosen.push_back(order[by_best[j]]);
      taken[by_best[j]] = 1;
    }
    // The estimation zone keeps its size and also takes the retrieval slots the cap left out.
    const int64_t want_est = r + e - static_cast<int64_t>(chosen.size());
    for (int64_t i = 0; i < ranked && static_cast<int64_t>(estimated.size()) < want_est; ++i) {
      if (i < cand && taken[i]) continue;
      estimated.push_back(order[i]);
    }
  }
  if (!second_pass) estimated.assign(order.begin() + chosen.size(), order.begin() + ranked);
  const int64_t retrieved = static_cast<int64_t>(chosen.size());
  KVWAVE_RETURN_IF_ERROR(EnsureRanked(head, set, chosen));

  std::vector<KvSpan> spans;
  int64_t steady_tokens = 0, retrieved_tokens = 0;
  SteadySpans(head, spans, steady_tokens);
  for (int32_t j : chosen) {
    auto [s, c] = set.Locate(j);
    const store::Segment& seg = *head.segments[s];
    const int64_t row = seg.cluster_row(c);
    spans.push_back({seg.key_row(row), seg.value_row(row), seg.cluster_size(c)});
    retrieved_tokens += seg.cluster_size(c);
  }
  KVWAVE_RETURN_IF_ERROR(gpu::cpu::ExactAttention(q, g, d, scale, p.dtype, spans, out, lse));

  // Estimation zone, one call per segment that has estimated clusters.
  std::vector<std::vector<int32_t>> per_segment(head.segments.size());
  for (int32_t j : estimated) {
    auto [s, c] = set.Locate(j);
    per_segment[s].push_back(c);
  }
  std::vector<float> est_out(g * d), est_lse(g);
  for (size_t s = 0; s < per_segment.size(); ++s) {
    if (per_segment[s].empty()) continue;
    const store::Segment& seg = *head.segments[s];
    KVWAVE_RETURN_IF_ERROR(gpu::cpu::EstimateAttention(
        q, g, d, scale, seg.centroids().data(), seg.value_sums().data(), seg.sizes().data(),
        seg.num_clusters(), per_segment[s], est_out.data(), est_lse.data(),
        p.estimation_spread ? seg.key_spreads().data() : nullptr));
    gpu::cpu::MergeLse(out, lse, est_out.data(), est_lse.data(), g, d);
  }
  if (stats != nullptr) {
    stats->steady_tokens += steady_tokens;
    stats->retrieved_tokens += retrieved_tokens;
    stats->retrieved_clusters += retrieved;
    stats->estimated_clusters += static_cast<int64_t>(estimated.size());
    stats->total_clusters += set.total;
    stats->scored_tokens += scored_tokens;
  }
  return absl::OkStatus();
}

namespace {

// Per query head, keeps the best k (score, position) pairs seen.
struct TopKeys {
  std::vector<std::pair<float, int64_t>> items;
  void Add(float score, int64_t pos) { items.emplace_back(score, pos); }
  void Emit(int64_t k, int64_t* positions, float* scores) {
    const int64_t m = std::min<int64_t>(k, items.size());
    auto better = [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::partial_sort(items.begin(), items.begin() + m, items.end(), better);
    for (int64_t i = 0; i < k; ++i) {
      positions[i] = i < m ? items[i].second : -1;
      scores[i] = i < m ? items[i].first : -std::numeric_limits<float>::infinity();
    }
  }
};

// Scores `rows` consecutive key rows for every query head of the group.
void ScoreRows(const HeadParams& p, const float* q, float scale, const std::byte* k0, int64_t rows,
               const auto& position_of_row, std::vector<TopKeys>& best, std::vector<float>& buf,
               int64_t& scored) {
  if (rows <= 0) return;
  buf.resize(rows * p.head_dim + p.group * rows);
  float* keys = buf.data();
  float* dots = keys + rows * p.head_dim;
  ToFloat(k0, p.dtype, keys, rows * p.head_dim);
  index::DotRowsMulti(q, p.group, keys, rows, p.head_dim, dots);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = position_of_row(r);
    if (pos < 0) continue;
    for (int h = 0; h < p.group; ++h) best[h].Add(dots[h * rows + r] * scale, pos);
  }
  scored += rows;
}

}  // namespace

absl::Status RetrieveHead(const HeadParams& p, const store::HeadKv& head, const float* q,
                          const RetrieveOptions& options, int64_t* positions, float* scores,
                          RetrieveStats* stats) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  std::vector<TopKeys> best(p.group);
  std::vector<float> buf;
  int64_t scored = 0, total = head.tail.size();
  auto segment_rows = [](const store::Segment& seg, int64_t row0) {
    return [&seg, row0](int64_t r) -> int64_t {
      int32_t t = seg.token_of_row(row0 + r);
      return t < 0 ? -1 : seg.first_position() + t;
    };
  };
  for (const auto& seg : head.segments) total += seg->num_tokens();
  const int64_t tail0 = head.tail.first_position();
  ScoreRows(
      p, q, scale, head.tail.key_row(0), head.tail.size(), [tail0](int64_t r) { return tail0 + r; },
      best, buf, scored);
  if (options.method == RetrieveMethod::kFlat) {
    for (const auto& seg : head.segments) {
      KVWAVE_RETURN_IF_ERROR(store::EnsureAllRows(*seg));
      ScoreRows(p, q, scale, seg->key_row(0), seg->num_rows(), segment_rows(*seg, 0), best, buf,
                scored);
    }
  } else {
    if (!head.segments.empty() && head.segments[0]->steady_tokens() > 0) {
      const store::Segment& first = *head.segments[0];
      ScoreRows(p, q, scale, first.key_row(0), first.steady_tokens(), segment_rows(first, 0), best,
                buf, scored);
    }
    ClusterSet set(head);
    std::vector<float> ranking = RankClusters(p, head, set, q, scale);
    const int64_t want = gpu::BudgetedClusters(options.cluster_budget, set.total);
    std::vector<int32_t> order(want);
    const int64_t got =
        set.total > 0 ? gpu::cpu::TopK(ranking.data(), set.total, want, order.data()) : 0;
    KVWAVE_RETURN_IF_ERROR(EnsureRanked(head, set, std::span(order.data(), got)));
    for (int64_t i = 0; i < got; ++i) {
      auto [s, c] = set.Locate(order[i]);
      const store::Segment& seg = *head.segments[s];
      const int64_t row = seg.cluster_row(c);
      ScoreRows(p, q, scale, seg.key_row(row), seg.cluster_size(c), segment_rows(seg, row), best,
                buf, scored);
    }
  }
  for (int h = 0; h < p.group; ++h) {
    best[h].Emit(options.k, positions + h * options.k, scores + h * options.k);
  }
  if (stats != nullptr) {
    stats->keys_scored += scored * p.group;
    stats->keys_total += total * p.group;
  }
  return absl::OkStatus();
}

absl::Status EnsureRowsAt(const store::HeadKv& head, std::span<const int64_t> positions) {
  std::vector<store::ClusterWant> wants;
  std::vector<int32_t> want_of(head.segments.size(), -1);
  for (int64_t position : positions) {
    if (position >= head.tail.first_position()) continue;
    auto it =
        std::upper_bound(head.segments.begin(), head.segments.end(), position,
                         [](int64_t pos, const auto& seg) { return pos < seg->first_position(); });
    if (it == head.segments.begin()) continue;
    const size_t s = static_cast<size_t>(it - head.segments.begin()) - 1;
    const store::Segment& seg = *head.segments[s];
    if (seg.rows_resident()) continue;
    const int32_t c =
        seg.cluster_of_row(seg.row_of_token(static_cast<int32_t>(position - seg.first_position())));
    if (c < 0) continue;
    if (want_of[s] < 0) {
      want_of[s] = static_cast<int32_t>(wants.size());
      wants.push_back({&seg, {}});
    }
    wants[want_of[s]].clusters.push_back(c);
  }
  for (store::ClusterWant& w : wants) {
    std::sort(w.clusters.begin(), w.clusters.end());
    w.clusters.erase(std::unique(w.clusters.begin(), w.clusters.end()), w.clusters.end());
  }
  return wants.empty() ? absl::OkStatus() : store::EnsureClusters(wants);
}

absl::Status GatherRow(const store::HeadKv& head, int64_t position, size_t row_bytes,
                       std::byte* k_out, std::byte* v_out) {
  const store::Tail& tail = head.tail;
  if (position >= tail.first_position()) {
    std::memcpy(k_out, tail.key_row(position - tail.first_position()), row_bytes);
    std::memcpy(v_out, tail.value_row(position - tail.first_position()), row_bytes);
    return absl::OkStatus();
  }
  auto it =
      std::upper_bound(head.segments.begin(), head.segments.end(), position,
                       [](int64_t pos, const auto& seg) { return pos < seg->first_position(); });
  KVWAVE_CHECK(it != head.segments.begin());
  const store::Segment& seg = **(it - 1);
  const int64_t row = seg.row_of_token(static_cast<int32_t>(position - seg.first_position()));
  if (!seg.rows_resident()) {
    const int32_t c = seg.cluster_of_row(row);
    if (c >= 0) {
      const store::ClusterWant want{&seg, {c}};
      KVWAVE_RETURN_IF_ERROR(store::EnsureClusters(std::span(&want, 1)));
    }
  }
  std::memcpy(k_out, seg.key_row(row), row_bytes);
  std::memcpy(v_out, seg.value_row(row), row_bytes);
  return absl::OkStatus();
}

}  // namespace kvwave::engine
