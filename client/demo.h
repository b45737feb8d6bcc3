// `kvwave demo`: the README's main job. Starts kvwaved (or connects to a given socket), loads a
// real attention trace (or synthetic data when none is present, saying so), appends all its K/V
// into one context, seals it, then for the last queries of the trace calls Attend and Retrieve
// and reports output error against exact attention (float64, computed here), recall@k against
// exact top-k, and latency.
//
// Thread-safety: RunDemo is a whole program step; call it from one thread.
#ifndef KVWAVE_CLIENT_DEMO_H_
#define KVWAVE_CLIENT_DEMO_H_

#include <string>

namespace kvwave::client {

struct DemoOptions {
  std::string socket_path;  // empty = start a private kvwaved
  std::string kvwaved;      // kvwaved binary (empty = FindKvwaved)
  std::string trace;        // trace prefix (empty = the default trace, else synthetic)
  bool synthetic = false;   // force synthetic data
  int queries = 256;        // last positions used as queries
  int top_k = 100;
  int append_chunk = 2048;  // tokens per Append
};

// Returns the process exit code (0 = the demo ran; errors are printed).
int RunDemo(const DemoOptions& options);

}  // namespace kvwave::client

#endif  // KVWAVE_CLIENT_DEMO_H_
