// kvwave-bench: one binary, one subcommand per workload (retrieval, synth, attend, serve, ...).
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include "bench/subcommand.h"

namespace kvwave::bench {

std::vector<Subcommand>& MutableSubcommands() {
  static std::vector<Subcommand> subcommands;
  return subcommands;
}

bool Register(const Subcommand& subcommand) {
  MutableSubcommands().push_back(subcommand);
  return true;
}

const std::vector<Subcommand>& Subcommands() { return MutableSubcommands(); }

void PrintEnvironmentHeader() {
  char host[256] = "?";
  gethostname(host, sizeof(host) - 1);
  std::string cpu = "?";
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  std::printf("# kvwave-bench  host=%s  cores=%u  cpu=%s\n", host,
              std::thread::hardware_concurrency(), cpu.c_str());
#ifdef NDEBUG
  std::printf("# build: optimised\n");
#else
  std::printf(
      "# WARNING: debug build (assertions on, no NDEBUG): timings are not representative\n");
#endif
}

}  // namespace kvwave::bench

int main(int argc, char** argv) {
  using kvwave::bench::Subcommands;
  if (argc >= 2) {
    for (const auto& sub : Subcommands()) {
      if (sub.name == argv[1]) return sub.run(argc - 1, argv + 1);
    }
  }
  std::fprintf(stderr,
               "usage: kvwave-bench SUBCOMMAND [options]   (SUBCOMMAND --help for its options)\n");
  for (const auto& sub : Subcommands()) {
    std::fprintf(stderr, "  %-12.*s %.*s\n", static_cast<int>(sub.name.size()), sub.name.data(),
                 static_cast<int>(sub.summary.size()), sub.summary.data());
  }
  return argc >= 2 && std::strcmp(argv[1], "--help") != 0 ? 2 : 0;
}
