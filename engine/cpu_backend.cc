#include "engine/cpu_backend.h"

#include <vector>

#include "config/status_macros.h"
#include "engine/head_ops.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

namespace kvwave::engine {
namespace {

class CpuBackend final : public AttentionBackend {
 public:
  explicit CpuBackend(const config::Settings& s)
      : settings_(s),
        arena_(s.compute_threads > 0 ? static_cast<int>(s.compute_threads)
                                     : tbb::task_arena::automatic) {}

  const char* name() const override { return "cpu"; }
  bool reads_pending_rows() const override { return true; }  // AttendHead: EnsureClusters

  absl::Status Attend(std::span<const AttendItem> items) override {
    // One task per (item, KV head); per-head stats summed afterwards (no shared writes).
    std::vector<std::pair<size_t, int32_t>> work;
    std::vector<HeadParams> params;
    params.reserve(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      const store::ModelShape& shape = items[i].context->shape();
      params.push_back(MakeHeadParams(settings_, shape, /*allocator=*/nullptr));
      for (int32_t h = 0; h < shape.kv_heads; ++h) work.emplace_back(i, h);
    }
    std::vector<absl::Status> status(work.size());
    std::vector<AttendStats> stats(work.size());
    arena_.execute([&] {
      tbb::parallel_for(size_t{0}, work.size(), [&](size_t w) {
        const auto [i, h] = work[w];
        const AttendItem& item = items[i];
        const HeadParams& p = params[i];
        const size_t gd = static_cast<size_t>(p.group) * p.head_dim;
        status[w] = AttendHead(p, item.context->layer(item.layer).heads[h], item.q.data() + h * gd,
                               item.budget, item.out.data() + h * gd, item.lse.data() + h * p.group,
                               &stats[w]);
      });
    });
    for (const absl::Status& s : status) KVWAVE_RETURN_IF_ERROR(s);
    for (size_t w = 0; w < work.size(); ++w) {
      AttendStats* out = items[work[w].first].stats;
      const AttendStats& s = stats[w];
      out->steady_tokens += s.steady_tokens;
      out->retrieved_tokens += s.retrieved_tokens;
      out->retrieved_clusters += s.retrieved_clusters;
      out->estimated_clusters += s.estimated_clusters;
      out->total_clusters += s.total_clusters;
      out->scored_tokens += s.scored_tokens;
    }
    return absl::OkStatus();
  }

 private:
  const config::Settings settings_;
  tbb::task_arena arena_;
};

}  // namespace

std::unique_ptr<AttentionBackend> CreateCpuBackend(const config::Settings& settings) {
  return std::make_unique<CpuBackend>(settings);
}

}  // namespace kvwave::engine
