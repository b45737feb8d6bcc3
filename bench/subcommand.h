// kvwave-bench subcommands register themselves here; bench_main.cc dispatches on argv[1].
// Each subcommand lives in its own bench/<name>_bench.cc and defines a static registrar:
//
//   static const bool kRegistered = kvwave::bench::Register(
//       {"retrieval", "recall / scan fraction / latency of each index on a trace", &RunRetrieval});
//
// Registration happens during static initialisation (single-threaded); lookups after main starts.
#ifndef KVWAVE_BENCH_SUBCOMMAND_H_
#define KVWAVE_BENCH_SUBCOMMAND_H_

#include <string_view>
#include <vector>

namespace kvwave::bench {

struct Subcommand {
  std::string_view name;
  std::string_view summary;
  int (*run)(int argc, char** argv);  // argv[0] is the subcommand name; returns the exit code
};

bool Register(const Subcommand& subcommand);
const std::vector<Subcommand>& Subcommands();

// Prints the environment header every benchmark starts with (host, cores, build type, a warning on
// debug builds), as lines starting with "# ".
void PrintEnvironmentHeader();

}  // namespace kvwave::bench

#endif  // KVWAVE_BENCH_SUBCOMMAND_H_
