// `kvwave-bench synth`: writes a synthetic attention trace (the .npy format of
// ../shared/data/README.md, float16) from a per-head Gaussian model in pre-RoPE space, optionally
// calibrated to a real trace (bench/lib/synth_model.h), so that scale tests need no model.
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "bench/lib/synth_model.h"
#include "bench/subcommand.h"
#include "client/trace_file.h"
#include "config/status_macros.h"

namespace kvwave::bench {
namespace {

struct SynthFlags {
  std::string out, calibrate;
  int64_t tokens = 131072;
  SynthShape shape;
  double ood = 1.0;
  double ood_lowvar = 0.0;
  double ood_lowvar_spread = 1.0;
  uint64_t seed = 1;
  int64_t calibrate_tokens = 16384;
};

absl::Status Run(const SynthFlags& f) {
  SynthModel model;
  if (!f.calibrate.empty()) {
    KVWAVE_ASSIGN_OR_RETURN(trace::Trace real, trace::Trace::Open(f.calibrate));
    KVWAVE_ASSIGN_OR_RETURN(model, FitModel(real, f.shape, f.calibrate_tokens));
    std::printf("# calibrated to %s (%ld tokens): heads %ld/%ld, d=%ld, rank %d\n",
                f.calibrate.c_str(), static_cast<long>(std::min(real.tokens, f.calibrate_tokens)),
                static_cast<long>(model.shape.q_heads), static_cast<long>(model.shape.kv_heads),
                static_cast<long>(model.shape.head_dim), model.shape.rank);
    for (size_t i = 0; i < model.heads.size(); ++i) {
      std::printf("#   layer %zu kv %zu: key rho %.3f, sigma[0] %.2f, query sigma[0] %.2f\n",
                  i / model.shape.kv_heads, i % model.shape.kv_heads, model.heads[i].rho,
                  model.heads[i].key.sigma[0], model.heads[i].query[0].sigma[0]);
    }
  } else {
    if (f.shape.q_heads % f.shape.kv_heads != 0 || f.shape.head_dim % 2 != 0 ||
        f.shape.rank > f.shape.head_dim) {
      return absl::InvalidArgumentError(
          "synth: q heads must be a multiple of kv heads, head dim even, rank <= head dim");
    }
    model = DefaultModel(f.shape, f.seed);
  }
  KVWAVE_RETURN_IF_ERROR(
      WriteSynthTrace(model, f.tokens, f.ood, f.seed, f.out, f.ood_lowvar, f.ood_lowvar_spread));
  std::printf(
      "# wrote %s_{q,k,v}.npy + .json: %ld tokens, %ld layers, ood %.2f, ood-lowvar %.2f "
      "(spread %.2f)\n",
      f.out.c_str(), static_cast<long>(f.tokens), static_cast<long>(model.shape.layers), f.ood,
      f.ood_lowvar, f.ood_lowvar_spread);
  return absl::OkStatus();
}

int RunSynth(int argc, char** argv) {
  SynthFlags f;
  CLI::App app{"write a synthetic attention trace calibrated to a real one"};
  app.add_option("--out", f.out, "output PREFIX")->required();
  app.add_option("--tokens", f.tokens, "positions to generate")->check(CLI::Range(2, 1 << 24));
  app.add_option("--layers", f.shape.layers, "layers")->check(CLI::Range(1, 64));
  app.add_option("--q-heads", f.shape.q_heads, "query heads (ignored with --calibrate)");
  app.add_option("--kv-heads", f.shape.kv_heads, "KV heads (ignored with --calibrate)");
  app.add_option("--head-dim", f.shape.head_dim, "head dim (ignored with --calibrate)");
  app.add_option("--rank", f.shape.rank, "rank of the low-rank covariances");
  app.add_option("--ood", f.ood, "query-mean scale: 1 = as calibrated, larger = more OOD");
  app.add_option("--ood-lowvar", f.ood_lowvar,
                 "add to every query this times |query mean| in the span of the keys' "
                 "least-variance principal directions (0 = off)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--ood-lowvar-spread", f.ood_lowvar_spread,
                 "how much the --ood-lowvar direction varies per token (0 = fixed per head)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--calibrate", f.calibrate, "real trace PREFIX to fit the model to");
  app.add_option("--calibrate-tokens", f.calibrate_tokens, "positions of it used for the fit");
  app.add_option("--seed", f.seed, "random seed");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  PrintEnvironmentHeader();
  if (absl::Status s = Run(f); !s.ok()) {
    std::fprintf(stderr, "synth: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

const bool kRegistered =
    Register({"synth", "write a synthetic trace calibrated to a real one", &RunSynth});

}  // namespace
}  // namespace kvwave::bench
