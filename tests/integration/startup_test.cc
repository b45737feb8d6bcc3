// Starting the real kvwaved on a persistent store it cannot open (issue 15, items 2 and 3): an
// unwritable persist.path, a second daemon on the same path (RocksDB's LOCK), truncated or
// flipped table files, a damaged MANIFEST or CURRENT, a deleted CURRENT. Each must end the
// daemon with exit code 1 and a message that names RocksDB's error (never a crash), and must
// leave every file of the store as it was: a later start with the damage repaired gets the
// cache back.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "tests/integration/harness.h"

namespace kvwave::testing {
namespace {

namespace fs = std::filesystem;

constexpr int kLayers = 2, kDim = 128, kBlock = 64, kRecent = 8, kBlocks = 3;
const client::ModelShape kShape{kLayers, 2, 1, kDim, DType::kF32};

std::vector<std::string> PersistSettings(const std::string& dir) {
  return {"persist.path=" + dir, "persist.durability=sync",
          "store.prefill_segment_tokens=" + std::to_string(kBlock),
          "store.recent_tokens=" + std::to_string(kRecent), "store.sink_tokens=2"};
}

std::vector<int32_t> DocTokens(int doc) {
  std::vector<int32_t> t(kBlocks * kBlock + kRecent);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>(doc * 100000 + i);
  return t;
}

std::vector<float> Rows(int doc, int layer, int64_t n, bool value) {
  std::vector<float> out(n * kDim);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<float>((doc * 31 + layer * 7 + i * 13 + (value ? 5 : 0)) % 1000) / 500.0f -
             1.0f;
  }
  return out;
}

std::string FreshDir(const std::string& name) {
  std::string dir =
      ::testing::TempDir() + "/kvwave_startup_" + name + "_" + std::to_string(getpid());
  fs::remove_all(dir);
  return dir;
}

// Writes `docs` documents of kBlocks shared blocks each, then stops the daemon gracefully (its
// memtables are flushed: the store then has table, blob and MANIFEST files).
void Populate(const std::string& dir, int docs) {
  auto daemon = StartDaemon(PersistSettings(dir));
  ASSERT_NE(daemon, nullptr);
  auto c = Connect(daemon->socket_path());
  ASSERT_NE(c, nullptr);
  for (int doc = 0; doc < docs; ++doc) {
    std::vector<int32_t> tokens = DocTokens(doc);
    auto opened = c->Open({kShape, tokens, ""});
    ASSERT_TRUE(opened.ok()) << opened.status();
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> k = Rows(doc, l, tokens.size(), false),
                         v = Rows(doc, l, tokens.size(), true);
      ASSERT_TRUE(c->Append(opened->id, l, tokens.size(), std::as_bytes(std::span(k)),
                            std::as_bytes(std::span(v)))
                      .ok());
    }
    ASSERT_TRUE(c->Seal(opened->id).ok());  // waits for the seals queued in the background
    ASSERT_TRUE(c->Close(opened->id).ok());
  }
  c.reset();
  ASSERT_EQ(daemon->Stop(SIGTERM, 30000).value_or(-1), 0);
}

// Blocks matched when reopening the documents (each must be exactly what was written).
int MatchedBlocks(const std::string& socket, int docs) {
  auto c = Connect(socket);
  int blocks = 0;
  for (int doc = 0; doc < docs; ++doc) {
    auto opened = c->Open({kShape, DocTokens(doc), ""});
    EXPECT_TRUE(opened.ok()) << opened.status();
    if (!opened.ok()) continue;
    const int64_t n = opened->matched_tokens;
    blocks += static_cast<int>(n / kBlock);
    std::vector<int64_t> pos(n);
    for (int64_t i = 0; i < n; ++i) pos[i] = i;
    for (int l = 0; l < kLayers && n > 0; ++l) {
      std::vector<float> k(n * kDim), v(n * kDim);
      EXPECT_TRUE(c->Gather(opened->id, l, pos, std::as_writable_bytes(std::span(k)),
                            std::as_writable_bytes(std::span(v)))
                      .ok());
      std::vector<float> want_k = Rows(doc, l, DocTokens(doc).size(), false);
      std::vector<float> want_v = Rows(doc, l, DocTokens(doc).size(), true);
      want_k.resize(n * kDim);
      want_v.resize(n * kDim);
      EXPECT_EQ(k, want_k) << "doc " << doc << " layer " << l;
      EXPECT_EQ(v, want_v) << "doc " << doc << " layer " << l;
    }
    (void)c->Close(opened->id);
  }
  return blocks;
}

struct Outcome {
  int exit_code = -1;  // 128 + signal when killed by one; -1 when it did not exit in time
  std::string stderr_text;
};

// Runs kvwaved with `settings` until it exits (it must fail at start), capturing its stderr.
// Waits on the end of its stderr, then on its exit; a daemon still running after `timeout_ms`
// (it started after all) is killed and reported as exit -1.
Outcome RunDaemon(const std::vector<std::string>& settings, int timeout_ms = 60000) {
  const std::string binary = BinaryDir() + "/rpc/kvwaved";
  const std::string socket =
      ::testing::TempDir() + "/kvwave_startup_" + std::to_string(getpid()) + ".sock";
  std::vector<std::string> args = {binary, "--socket", socket};
  for (const std::string& s : settings) {
    args.push_back("--set");
    args.push_back(s);
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int err[2];
  if (pipe2(err, O_CLOEXEC) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(err[1], STDERR_FILENO);
    const int null = open("/dev/null", O_WRONLY);
    dup2(null, STDOUT_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(err[1]);
  Outcome out;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  bool timed_out = false;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          give_up - std::chrono::steady_clock::now())
                          .count();
    pollfd p{err[0], POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0) {
      timed_out = true;
      break;
    }
    char buf[4096];
    const ssize_t n = read(err[0], buf, sizeof(buf));
    if (n <= 0) break;  // EOF: the daemon exited
    out.stderr_text.append(buf, static_cast<size_t>(n));
  }
  close(err[0]);
  if (timed_out) kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  if (timed_out) return out;
  out.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return out;
}

// Name -> size of every file of the store but RocksDB's own log (LOG, rotated at every open)
// and LOCK.
std::map<std::string, uintmax_t> Files(const std::string& dir) {
  std::map<std::string, uintmax_t> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file() && !name.starts_with("LOG") && name != "LOCK") {
      files[name] = e.file_size();
    }
  }
  return files;
}

// Starts kvwaved on `settings` (it must start) with its stderr in `log`; returns the daemon.
std::unique_ptr<client::LocalDaemon> StartLogged(std::vector<std::string> settings,
                                                 const std::string& log) {
  client::LocalDaemonOptions o;
  o.binary = BinaryDir() + "/rpc/kvwaved";
  o.log_path = log;
  settings.push_back("log.level=warn");
  o.overrides = std::move(settings);
  auto d = client::LocalDaemon::Start(o);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *std::move(d) : nullptr;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<fs::path> FilesWithExtension(const std::string& dir, const std::string& ext) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ext) out.push_back(e.path());
  }
  return out;
}

fs::path Manifest(const std::string& dir) {
  std::ifstream f(fs::path(dir) / "CURRENT");
  std::string name;
  std::getline(f, name);
  return fs::path(dir) / name;
}

void FlipBytes(const fs::path& file, uintmax_t from, uintmax_t to, uintmax_t step) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  for (uintmax_t at = from; at < to; at += step) {
    f.seekg(static_cast<std::streamoff>(at));
    char b = 0;
    f.read(&b, 1);
    b = static_cast<char>(b ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(at));
    f.write(&b, 1);
  }
}

// The daemon refused to start: exit code 1, and stderr names the store and each `words`.
void ExpectRefused(const Outcome& o, const std::vector<std::string>& words) {
  EXPECT_EQ(o.exit_code, 1) << "stderr:\n" << o.stderr_text;
  EXPECT_NE(o.stderr_text.find("rocksdb"), std::string::npos) << o.stderr_text;
  for (const std::string& w : words) {
    EXPECT_NE(o.stderr_text.find(w), std::string::npos) << "no '" << w << "' in:\n"
                                                        << o.stderr_text;
  }
}

TEST(StartupTest, PersistPathBelowAFileExitsWithRocksDbError) {
  const std::string dir = FreshDir("below_file");
  fs::create_directories(dir);
  std::ofstream(dir + "/file") << "x";
  Outcome o = RunDaemon(PersistSettings(dir + "/file/db"));
  ExpectRefused(o, {"IO error", dir + "/file/db", "writable directory"});
  fs::remove_all(dir);
}

TEST(StartupTest, PersistPathIsAFileExitsWithRocksDbError) {
  const std::string dir = FreshDir("is_file");
  fs::create_directories(dir);
  std::ofstream(dir + "/db") << "x";
  Outcome o = RunDaemon(PersistSettings(dir + "/db"));
  ExpectRefused(o, {"IO error", dir + "/db"});
  EXPECT_EQ(fs::file_size(dir + "/db"), 1u);
  fs::remove_all(dir);
}

TEST(StartupTest, UnwritablePersistPathExitsWithRocksDbError) {
  if (geteuid() == 0) GTEST_SKIP() << "root ignores directory permissions";
  const std::string dir = FreshDir("unwritable");
  fs::create_directories(dir);
  fs::permissions(dir, fs::perms::owner_read | fs::perms::owner_exec);
  Outcome o = RunDaemon(PersistSettings(dir + "/db"));
  ExpectRefused(o, {"IO error", "writable directory"});
  fs::permissions(dir, fs::perms::owner_all);
  fs::remove_all(dir);
}

TEST(StartupTest, SecondDaemonOnTheSamePathExitsNamingTheLock) {
  const std::string dir = FreshDir("lock");
  auto first = StartDaemon(PersistSettings(dir));
  ASSERT_NE(first, nullptr);
  Outcome o = RunDaemon(PersistSettings(dir));
  ExpectRefused(o, {"lock", "another process"});
  EXPECT_TRUE(first->Running());  // the first daemon is untouched and still serves
  auto c = Connect(first->socket_path());
  ASSERT_NE(c, nullptr);
  EXPECT_TRUE(c->Ping().ok());
  c.reset();
  first.reset();
  fs::remove_all(dir);
}

TEST(StartupTest, TruncatedTableFileExitsWithCorruption) {
  const std::string dir = FreshDir("truncated_sst");
  Populate(dir, 2);
  std::vector<fs::path> tables = FilesWithExtension(dir, ".sst");
  ASSERT_FALSE(tables.empty());
  for (const fs::path& t : tables) fs::resize_file(t, fs::file_size(t) / 2);
  const auto before = Files(dir);
  Outcome o = RunDaemon(PersistSettings(dir));
  ExpectRefused(o, {"Corruption", "damaged", "aside"});
  EXPECT_EQ(Files(dir), before) << "a store that did not open was changed";
  fs::remove_all(dir);
}

TEST(StartupTest, FlippedTableFileNeverServesBadData) {
  const std::string dir = FreshDir("flipped_sst");
  Populate(dir, 2);
  std::vector<fs::path> tables = FilesWithExtension(dir, ".sst");
  ASSERT_FALSE(tables.empty());
  // Every byte of the data blocks (the footer and index at the end stay readable).
  for (const fs::path& t : tables) FlipBytes(t, 0, fs::file_size(t) / 2, 1);
  Outcome o = RunDaemon(PersistSettings(dir));
  ExpectRefused(o, {"Corruption", "damaged", "aside"});
  fs::remove_all(dir);
}

// A MANIFEST cut short reads as one whose last edits were never written: RocksDB opens it and
// would delete the table and blob files it no longer references (the whole cache here). They
// are moved aside instead, with the MANIFEST, and the log says where.
TEST(StartupTest, TruncatedManifestSetsUnreferencedFilesAsideInsteadOfDeletingThem) {
  const std::string dir = FreshDir("manifest");
  Populate(dir, 1);
  const fs::path manifest = Manifest(dir);
  ASSERT_TRUE(fs::exists(manifest)) << manifest;
  fs::resize_file(manifest, fs::file_size(manifest) / 2);
  const uintmax_t truncated = fs::file_size(manifest);
  std::map<std::string, uintmax_t> data;
  for (const auto& [name, bytes] : Files(dir)) {
    if (name.ends_with(".sst") || name.ends_with(".blob")) data[name] = bytes;
  }
  ASSERT_FALSE(data.empty());
  const std::string log = dir + ".log";
  auto daemon = StartLogged(PersistSettings(dir), log);
  ASSERT_NE(daemon, nullptr);
  const std::string text = ReadFile(log);
  EXPECT_NE(text.find("not referenced by its MANIFEST"), std::string::npos) << text;
  fs::path aside;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().starts_with("unreferenced-")) aside = e.path();
  }
  ASSERT_FALSE(aside.empty()) << text;
  EXPECT_NE(text.find(aside.string()), std::string::npos) << text;
  std::map<std::string, uintmax_t> moved = Files(aside.string());
  for (const auto& [name, bytes] : data) {
    EXPECT_EQ(moved[name], bytes) << name << " was not kept";
  }
  EXPECT_EQ(moved[manifest.filename().string()], truncated) << "the MANIFEST was not kept";
  daemon.reset();
  fs::remove_all(dir);
  fs::remove(log);
}

// After a clean stop every file is referenced: nothing is moved.
TEST(StartupTest, CleanRestartMovesNothingAside) {
  const std::string dir = FreshDir("clean");
  Populate(dir, 1);
  const auto before = Files(dir);
  const std::string log = dir + ".log";
  auto daemon = StartLogged(PersistSettings(dir), log);
  ASSERT_NE(daemon, nullptr);
  EXPECT_EQ(MatchedBlocks(daemon->socket_path(), 1), kBlocks);
  for (const auto& e : fs::directory_iterator(dir)) {
    EXPECT_FALSE(e.path().filename().string().starts_with("unreferenced-")) << ReadFile(log);
  }
  EXPECT_EQ(ReadFile(log).find("not referenced"), std::string::npos);
  daemon.reset();
  fs::remove_all(dir);
  fs::remove(log);
}

TEST(StartupTest, FlippedManifestExitsWithCorruption) {
  const std::string dir = FreshDir("manifest_flip");
  Populate(dir, 1);
  const fs::path manifest = Manifest(dir);
  FlipBytes(manifest, 0, fs::file_size(manifest), 1);
  const auto before = Files(dir);
  Outcome o = RunDaemon(PersistSettings(dir));
  ExpectRefused(o, {"Corruption", "damaged"});
  EXPECT_EQ(Files(dir), before);
  fs::remove_all(dir);
}

TEST(StartupTest, GarbledCurrentExitsAndTheStoreComesBackWhenRestored) {
  const std::string dir = FreshDir("current_garbled");
  Populate(dir, 2);
  const std::string current = (fs::path(dir) / "CURRENT").string();
  std::string good;
  std::getline(std::ifstream(current), good);
  std::ofstream(current, std::ios::trunc) << "MANIFEST-99999x\n";
  const auto before = Files(dir);
  Outcome o = RunDaemon(PersistSettings(dir));
  EXPECT_EQ(o.exit_code, 1) << o.stderr_text;
  EXPECT_NE(o.stderr_text.find("rocksdb open " + dir), std::string::npos) << o.stderr_text;
  EXPECT_EQ(Files(dir), before);
  std::ofstream(current, std::ios::trunc) << good << "\n";
  auto daemon = StartDaemon(PersistSettings(dir));
  ASSERT_NE(daemon, nullptr);
  EXPECT_EQ(MatchedBlocks(daemon->socket_path(), 2), 2 * kBlocks);
  daemon.reset();
  fs::remove_all(dir);
}

TEST(StartupTest, DeletedCurrentRefusesToStartAndKeepsEveryFile) {
  const std::string dir = FreshDir("current_deleted");
  Populate(dir, 2);
  const std::string manifest = Manifest(dir).filename().string();
  fs::remove(fs::path(dir) / "CURRENT");
  const auto before = Files(dir);
  ASSERT_FALSE(FilesWithExtension(dir, ".blob").empty());
  // Twice: the first refusal must not leave anything behind that lets the second start wipe it.
  for (int attempt = 0; attempt < 2; ++attempt) {
    Outcome o = RunDaemon(PersistSettings(dir));
    EXPECT_EQ(o.exit_code, 1) << o.stderr_text;
    for (const std::string& w :
         std::vector<std::string>{"no CURRENT", "aside", manifest + " > " + dir + "/CURRENT"}) {
      EXPECT_NE(o.stderr_text.find(w), std::string::npos) << "no '" << w << "' in:\n"
                                                          << o.stderr_text;
    }
    EXPECT_EQ(Files(dir), before) << "attempt " << attempt;
  }
  // The recovery the message gives brings every block back, bit-exact.
  std::ofstream(fs::path(dir) / "CURRENT") << manifest << "\n";
  auto daemon = StartDaemon(PersistSettings(dir));
  ASSERT_NE(daemon, nullptr);
  EXPECT_EQ(MatchedBlocks(daemon->socket_path(), 2), 2 * kBlocks);
  daemon.reset();
  fs::remove_all(dir);
}

TEST(StartupTest, EmptyOrMissingDirectoryStartsFresh) {
  const std::string dir = FreshDir("fresh");
  fs::create_directories(dir);  // empty: a new store is created in it
  auto daemon = StartDaemon(PersistSettings(dir));
  ASSERT_NE(daemon, nullptr);
  EXPECT_EQ(MatchedBlocks(daemon->socket_path(), 1), 0);
  daemon.reset();
  EXPECT_TRUE(fs::exists(fs::path(dir) / "CURRENT"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace kvwave::testing
