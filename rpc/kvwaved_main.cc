// kvwaved: the kvwave store daemon. Loads settings (defaults, --config FILE, --set key=value),
// creates the engine, serves it (rpc/server.h) until SIGTERM/SIGINT, reloads reloadable settings
// on SIGHUP (and warns about changed keys that need a restart). With --ready-fd N it writes
// "ready <pid>\n" to fd N and closes it once every listener accepts connections, so a
// supervisor or test waits on an event instead of polling the socket.
//
// Start-up registers each component's stop right after starting it; shutdown runs in reverse:
// stop accepting -> drain requests -> close connections -> release sessions -> engine.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "boost/asio/io_context.hpp"
#include "boost/asio/signal_set.hpp"
#include "config/settings.h"
#include "engine/backend_select.h"
#include "engine/engine.h"
#include "rpc/log.h"
#include "rpc/server.h"

namespace kvwave::rpc {
namespace {

struct Flags {
  std::string config_path;
  std::vector<std::string> overrides;
  std::string socket_path;
  bool print_config = false;
  int ready_fd = -1;
};

// Tells whoever waits on --ready-fd that kvwaved is listening.
void SignalReady(int fd) {
  if (fd < 0) return;
  const std::string line = "ready " + std::to_string(getpid()) + "\n";
  ssize_t n;
  do {
    n = write(fd, line.data(), line.size());
  } while (n < 0 && errno == EINTR);
  if (n != static_cast<ssize_t>(line.size())) {
    Logger("kvwaved")->warn("--ready-fd {}: {}", fd, n < 0 ? std::strerror(errno) : "short write");
  }
  close(fd);
}

// Keys SIGHUP cannot apply, whose value in the file now differs from the running one.
std::vector<std::string> ChangedNeedingRestart(const config::Settings& fresh,
                                               const config::Settings& current) {
  std::vector<std::string> out;
  for (const config::Key& key : config::AllKeys()) {
    if (key.reloadable) continue;
    if (config::ValueOf(fresh, key.name) != config::ValueOf(current, key.name)) {
      out.emplace_back(key.name);
    }
  }
  return out;
}

bool SameIds(const config::IdSet& a, const config::IdSet& b) {
  return a.any == b.any && a.ids == b.ids;
}

// Whether two sets of [trust.namespace.NAME] tables grant the same rights.
bool SameNamespaces(const std::vector<config::NamespaceRule>& a,
                    const std::vector<config::NamespaceRule>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](const auto& x, const auto& y) {
    return x.name == y.name && SameIds(x.write_uids, y.write_uids) &&
           SameIds(x.write_gids, y.write_gids) && SameIds(x.read_uids, y.read_uids) &&
           SameIds(x.read_gids, y.read_gids) && x.write_token == y.write_token &&
           x.read_token == y.read_token;
  });
}

// SIGINT/SIGTERM: the first drains; a second SIGINT forces exit. SIGHUP: reload.
void WatchSignals(boost::asio::signal_set& signals, Server& server, const Flags& flags,
                  config::Settings& current, int& stops) {
  signals.async_wait([&](const boost::system::error_code& ec, int signo) {
    if (ec) return;
    auto log = Logger("kvwaved");
    if (signo == SIGHUP) {
      absl::StatusOr<config::Settings> fresh = config::Load(flags.config_path, flags.overrides);
      if (!fresh.ok()) {
        log->error("SIGHUP: reload failed, keeping the current settings: {}",
                   fresh.status().ToString());
      } else {
        for (const std::string& key : ChangedNeedingRestart(*fresh, current)) {
          log->warn(
              "SIGHUP: {} changed ({} -> {}) but is not reloadable: restart kvwaved to apply it",
              key, config::ValueOf(current, key), config::ValueOf(*fresh, key));
        }
        if (!SameNamespaces(fresh->namespaces, current.namespaces)) {  // tokens are not logged
          log->warn(
              "SIGHUP: the [trust.namespace.*] tables changed but are not reloadable: restart "
              "kvwaved to apply them (the running ones stay in force)");
        }
        const std::vector<std::string> changed = config::ApplyReloadable(*fresh, current);
        server.ApplySettings(current);
        if (absl::Status st = SetLogLevel(current.log_level); !st.ok()) {
          log->error("{}", st.ToString());
        }
        log->info(
            "SIGHUP: reloaded {} setting(s){}", changed.size(), changed.empty() ? "" : ": " + [&] {
              std::string s;
              for (const auto& c : changed) s += (s.empty() ? "" : ", ") + c;
              return s;
            }());
      }
    } else if (++stops == 1) {
      log->info("signal {}: graceful shutdown (send it again to force exit)", signo);
      server.BeginShutdown();
    } else if (signo == SIGTERM) {
      log->info("SIGTERM again: already shutting down (SIGINT forces exit)");
    } else {
      log->warn("signal {} again: forced exit", signo);
      std::fflush(nullptr);
      std::_Exit(128 + signo);
    }
    WatchSignals(signals, server, flags, current, stops);
  });
}

int Main(int argc, char** argv) {
  Flags flags;
  CLI::App app{"kvwaved: the kvwave KV-cache store daemon"};
  app.add_option("--config", flags.config_path, "TOML settings file");
  app.add_option("--set", flags.overrides, "override a setting: section.key=value (repeatable)");
  app.add_option("--socket", flags.socket_path, "shorthand for --set rpc.socket_path=PATH");
  app.add_option("--ready-fd", flags.ready_fd,
                 "write \"ready <pid>\" to this inherited fd, then close it, once listening");
  app.add_flag("--print-config", flags.print_config,
               "print every setting with its default and description, then exit");
  CLI11_PARSE(app, argc, argv);
  if (flags.print_config) {
    std::fputs(config::PrintDefaults().c_str(), stdout);
    return 0;
  }
  if (!flags.socket_path.empty()) flags.overrides.push_back("rpc.socket_path=" + flags.socket_path);
  // The engine and store log through spdlog's default logger: to stderr like the daemon's own.
  spdlog::set_default_logger(Logger("engine"));
  auto log = Logger("kvwaved");
  absl::StatusOr<config::Settings> loaded = config::Load(flags.config_path, flags.overrides);
  if (!loaded.ok()) {
    log->error("settings: {}", loaded.status().ToString());
    return 2;
  }
  config::Settings settings = *std::move(loaded);
  if (absl::Status st = SetLogLevel(settings.log_level); !st.ok()) log->error("{}", st.ToString());

  // The attention backend and host KV memory (gpu.mode, store.pinned_memory), handed to the
  // engine: nothing here configures a process-wide global.
  absl::StatusOr<engine::SelectedDeps> deps = engine::SelectEngineDeps(settings);
  if (!deps.ok()) {
    log->error("{}", std::string(deps.status().message()));
    return 2;
  }
  log->info("{}", deps->description);

  // Installed before anything starts so an early SIGTERM is queued, not fatal.
  boost::asio::io_context signal_io;
  boost::asio::signal_set signals(signal_io, SIGINT, SIGTERM, SIGHUP);

  absl::StatusOr<std::unique_ptr<engine::Engine>> engine =
      engine::Engine::Create(settings, std::move(deps->deps));
  if (!engine.ok()) {
    log->error("engine: {}", engine.status().ToString());
    return 1;
  }
  Server server(**engine, settings);
  if (absl::Status st = server.Start(); !st.ok()) {
    log->error("server: {}", st.ToString());
    return 1;
  }
  log->info("kvwaved {} ready (pid {})", "0.1.0", getpid());
  SignalReady(flags.ready_fd);

  int stops = 0;
  WatchSignals(signals, server, flags, settings, stops);
  std::thread signal_thread([&] { signal_io.run(); });
  server.Wait();  // returns once BeginShutdown has drained and closed everything
  signal_io.stop();
  signal_thread.join();
  log->info("engine: shutting down");
  engine->reset();
  log->info("exit {}", server.exit_code());
  return server.exit_code();
}

}  // namespace
}  // namespace kvwave::rpc

int main(int argc, char** argv) { return kvwave::rpc::Main(argc, argv); }
