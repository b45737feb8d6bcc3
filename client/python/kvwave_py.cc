// Python binding of the kvwave C++ client (module `kvwave`): numpy arrays in and out. Any object
// numpy can view (a CPU torch tensor of float32/float16, for instance) is accepted where an array
// is; bf16 K/V travel as uint16 arrays holding the raw bits.
//
// Thread-safety: as kvwave::client::Client (one request in flight per Client; calls release the
// GIL while they wait for kvwaved).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "kvwave/client.h"

namespace py = pybind11;
namespace kc = kvwave::client;

namespace {

// A failed call, carried as a C++ exception to pybind11's dispatcher, whose translator (below,
// run with the GIL held) raises the Python exception. Throwing it needs no GIL, so a status is
// safe to raise from anywhere; PyErr_* and py::error_already_set are never used without the GIL
// (with the GIL released they crashed the interpreter when kvwaved went away).
class StatusError : public std::exception {
 public:
  explicit StatusError(absl::Status status)
      : status_(std::move(status)), message_(status_.ToString()) {}
  const char* what() const noexcept override { return message_.c_str(); }
  absl::StatusCode code() const { return status_.code(); }

 private:
  absl::Status status_;
  std::string message_;
};

// Python exception types of the module: kvwave.Error (a RuntimeError) for statuses without a
// closer built-in, and kvwave.ResourceExhaustedError (an Error) at a server limit.
PyObject* g_error = nullptr;
PyObject* g_resource_exhausted = nullptr;

// UNAVAILABLE (kvwaved gone, connection refused or broken) -> ConnectionError,
// DEADLINE_EXCEEDED -> TimeoutError, INVALID_ARGUMENT / OUT_OF_RANGE -> ValueError,
// NOT_FOUND -> KeyError, PERMISSION_DENIED / UNAUTHENTICATED -> PermissionError,
// RESOURCE_EXHAUSTED -> kvwave.ResourceExhaustedError, anything else -> kvwave.Error.
PyObject* ExceptionType(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnavailable:
      return PyExc_ConnectionError;
    case absl::StatusCode::kDeadlineExceeded:
      return PyExc_TimeoutError;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return PyExc_ValueError;
    case absl::StatusCode::kNotFound:
      return PyExc_KeyError;
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnauthenticated:
      return PyExc_PermissionError;
    case absl::StatusCode::kResourceExhausted:
      return g_resource_exhausted;
    default:
      return g_error;
  }
}

[[noreturn]] void Raise(const absl::Status& st) { throw StatusError(st); }

// Runs fn (a client call) with the GIL released and returns its result; errors are raised by the
// caller once the GIL is back.
template <typename Fn>
auto WithoutGil(Fn&& fn) {
  py::gil_scoped_release release;
  return fn();
}

void Check(const absl::Status& st) {
  if (!st.ok()) Raise(st);
}

template <typename T>
T Value(absl::StatusOr<T> s) {
  if (!s.ok()) Raise(s.status());
  return *std::move(s);
}

kvwave::DType ParseType(const std::string& name) {
  auto t = kvwave::ParseDType(name);
  if (!t.ok()) Raise(t.status());
  return *t;
}

std::span<const std::byte> Bytes(const py::array& a) {
  return {static_cast<const std::byte*>(a.data()), static_cast<size_t>(a.nbytes())};
}

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

py::dict InfoDict(const kc::ContextInfo& i) {
  py::dict d;
  d["id"] = i.id;
  d["layers"] = i.shape.layers;
  d["q_heads"] = i.shape.q_heads;
  d["kv_heads"] = i.shape.kv_heads;
  d["head_dim"] = i.shape.head_dim;
  d["dtype"] = std::string(kvwave::DTypeName(i.shape.dtype));
  d["tokens_per_layer"] = i.tokens_per_layer;
  d["sealed_segments"] = i.sealed_segments;
  d["bytes"] = i.bytes;
  d["session_id"] = i.session_id;
  d["has_queries"] = i.has_queries;
  d["graph_segments"] = i.graph_segments;
  d["query_tokens"] = i.query_tokens;
  return d;
}

kc::AttendMethod ParseAttendMethod(const std::string& m) {
  if (m == "default") return kc::AttendMethod::kDefault;
  if (m == "retroinfer") return kc::AttendMethod::kRetroInfer;
  if (m == "retrievalattention") return kc::AttendMethod::kRetrievalAttention;
  throw py::value_error("method must be 'default', 'retroinfer' or 'retrievalattention'");
}

// The Python-side client: remembers each open context's shape to size outputs.
// A batch's entries: its contexts, with one (retrieval, estimation) budget each or none.
std::vector<kc::AttendBatchEntry> BatchEntries(
    const std::vector<uint64_t>& ctxs, const std::vector<std::pair<double, double>>& budgets) {
  if (!budgets.empty() && budgets.size() != ctxs.size()) {
    throw py::value_error("budgets: one (retrieval, estimation) per context, or none");
  }
  std::vector<kc::AttendBatchEntry> entries(ctxs.size());
  for (size_t i = 0; i < ctxs.size(); ++i) {
    entries[i].ctx = ctxs[i];
    if (!budgets.empty()) entries[i].budget = {budgets[i].first, budgets[i].second};
  }
  return entries;
}

class PyClient {
 public:
  PyClient(const std::string& socket_path, size_t shared_memory_bytes, const std::string& host,
           int port, const std::string& token, int deadline_ms,
           std::vector<std::string> credentials) {
    kc::ClientOptions o;
    o.credentials = std::move(credentials);
    o.socket_path = socket_path;
    o.shared_memory_bytes = shared_memory_bytes;
    o.tcp_host = host;
    o.tcp_port = port;
    o.token = token;
    o.deadline_ms = deadline_ms;
    o.client_name = "kvwave-python";
    client_ = Value(WithoutGil([&] { return kc::Client::Connect(o); }));
  }

  void Ping() {
    Check(WithoutGil([&] { return client_->Ping(); }));
  }

  py::tuple Open(int layers, int q_heads, int kv_heads, int head_dim, const std::string& dtype,
                 std::vector<int32_t> token_ids, const std::string& ns) {
    kc::OpenOptions o;
    o.shape = {layers, q_heads, kv_heads, head_dim, ParseType(dtype)};
    o.token_ids = std::move(token_ids);
    o.prefix_namespace = ns;
    kc::OpenResult opened = Value(WithoutGil([&] { return client_->Open(o); }));
    return py::make_tuple(opened.id, opened.matched_tokens);
  }

  void Append(uint64_t ctx, int layer, py::array k, py::array v, py::object q) {
    k = py::array::ensure(k, py::array::c_style);
    v = py::array::ensure(v, py::array::c_style);
    if (!k || !v) throw py::value_error("k and v must be arrays");
    if (k.ndim() < 1 || v.ndim() < 1 || k.shape(0) != v.shape(0)) {
      throw py::value_error("k and v must be [n, kv_heads, head_dim] with the same n");
    }
    const int64_t n = k.shape(0);
    const std::span<const std::byte> kb = Bytes(k), vb = Bytes(v);
    if (q.is_none()) {
      Check(WithoutGil([&] { return client_->Append(ctx, layer, n, kb, vb); }));
      return;
    }
    F32Array qa = F32Array::ensure(q);
    if (!qa || qa.ndim() != 3 || qa.shape(0) != n) {
      throw py::value_error("q must be [n, q_heads, head_dim] float32 with k's n");
    }
    const std::span<const float> qs(qa.data(), static_cast<size_t>(qa.size()));
    Check(WithoutGil([&] { return client_->AppendWithQueries(ctx, layer, n, kb, vb, qs); }));
  }

  void Seal(uint64_t ctx) {
    Check(WithoutGil([&] { return client_->Seal(ctx); }));
  }

  py::tuple Attend(uint64_t ctx, int layer, F32Array q, double retrieval, double estimation,
                   const std::string& method, int graph_top_k, int beam) {
    const kc::AttendBudget budget{retrieval, estimation, ParseAttendMethod(method), graph_top_k,
                                  beam};
    const int64_t heads = q.ndim() == 2 ? q.shape(0) : 0;
    if (heads == 0) throw py::value_error("q must be [q_heads, head_dim] float32");
    F32Array out({q.shape(0), q.shape(1)});
    F32Array lse(std::vector<py::ssize_t>{q.shape(0)});
    kc::AttendStats stats;
    {
      std::span<float> o(out.mutable_data(), out.size()), l(lse.mutable_data(), lse.size());
      std::span<const float> qs(q.data(), q.size());
      Check(WithoutGil([&] { return client_->Attend(ctx, layer, qs, budget, o, l, &stats); }));
    }
    py::dict s;
    s["steady_tokens"] = stats.steady_tokens;
    s["retrieved_tokens"] = stats.retrieved_tokens;
    s["retrieved_clusters"] = stats.retrieved_clusters;
    s["estimated_clusters"] = stats.estimated_clusters;
    s["total_clusters"] = stats.total_clusters;
    s["scored_tokens"] = stats.scored_tokens;
    s["graph_keys_scored"] = stats.graph_keys_scored;
    return py::make_tuple(out, lse, s);
  }

  // q: [B, q_heads, head_dim]; budgets: None or one (retrieval, estimation) per context.
  py::tuple AttendBatch(int layer, const std::vector<uint64_t>& ctxs, F32Array q,
                        const std::vector<std::pair<double, double>>& budgets) {
    if (q.ndim() != 3 || q.shape(0) != static_cast<py::ssize_t>(ctxs.size())) {
      throw py::value_error("q must be [len(ctxs), q_heads, head_dim] float32");
    }
    const std::vector<kc::AttendBatchEntry> entries = BatchEntries(ctxs, budgets);
    F32Array out({q.shape(0), q.shape(1), q.shape(2)});
    F32Array lse({q.shape(0), q.shape(1)});
    std::vector<kc::AttendStats> stats(ctxs.size());
    {
      std::span<float> o(out.mutable_data(), out.size()), l(lse.mutable_data(), lse.size());
      std::span<const float> qs(q.data(), q.size());
      Check(WithoutGil(
          [&] { return client_->AttendBatch(layer, entries, qs, o, l, std::span(stats)); }));
    }
    py::list s;
    for (const kc::AttendStats& st : stats) {
      py::dict d;
      d["steady_tokens"] = st.steady_tokens;
      d["retrieved_tokens"] = st.retrieved_tokens;
      d["retrieved_clusters"] = st.retrieved_clusters;
      d["estimated_clusters"] = st.estimated_clusters;
      d["total_clusters"] = st.total_clusters;
      d["scored_tokens"] = st.scored_tokens;
      d["graph_keys_scored"] = st.graph_keys_scored;
      s.append(d);
    }
    return py::make_tuple(out, lse, s);
  }

  // Device tensors (pointers and a stream as integers: kvwave_torch.py passes torch's).
  uint64_t RegisterDeviceBuffers(uintptr_t q, size_t q_bytes, uintptr_t out, size_t out_bytes,
                                 uintptr_t lse, size_t lse_bytes) {
    return Value(WithoutGil([&] {
      return client_->RegisterDeviceBuffers(reinterpret_cast<const void*>(q), q_bytes,
                                            reinterpret_cast<void*>(out), out_bytes,
                                            reinterpret_cast<void*>(lse), lse_bytes);
    }));
  }

  // Buffers as (ipc_handle bytes, offset, bytes).
  uint64_t RegisterDeviceHandles(const py::bytes& uuid,
                                 const std::tuple<py::bytes, uint64_t, uint64_t>& q,
                                 const std::tuple<py::bytes, uint64_t, uint64_t>& out,
                                 const std::tuple<py::bytes, uint64_t, uint64_t>& lse,
                                 const py::bytes& q_ready, const py::bytes& out_ready) {
    auto buf = [](const std::tuple<py::bytes, uint64_t, uint64_t>& t) {
      return kc::DeviceBufferHandle{std::string(std::get<0>(t)), std::get<1>(t), std::get<2>(t)};
    };
    const kc::DeviceHandles h{
        std::string(uuid),     buf(q), buf(out), buf(lse), std::string(q_ready),
        std::string(out_ready)};
    return Value(WithoutGil([&] { return client_->RegisterDeviceHandles(h); }));
  }

  void UnregisterDeviceBuffers(uint64_t registration) {
    Check(WithoutGil([&] { return client_->UnregisterDeviceBuffers(registration); }));
  }

  py::list AttendDevice(uint64_t registration, int layer, const std::vector<uint64_t>& ctxs,
                        uint64_t q_offset, uint64_t out_offset, uint64_t lse_offset,
                        uintptr_t stream, const std::vector<std::pair<double, double>>& budgets) {
    const std::vector<kc::AttendBatchEntry> entries = BatchEntries(ctxs, budgets);
    std::vector<kc::AttendStats> stats(ctxs.size());
    Check(WithoutGil([&] {
      return client_->AttendBatchDevice(registration, layer, entries,
                                        {q_offset, out_offset, lse_offset},
                                        reinterpret_cast<CUstream_st*>(stream), std::span(stats));
    }));
    py::list s;
    for (const kc::AttendStats& st : stats) {
      py::dict d;
      d["steady_tokens"] = st.steady_tokens;
      d["estimated_clusters"] = st.estimated_clusters;
      d["total_clusters"] = st.total_clusters;
      s.append(d);
    }
    return s;
  }

  py::tuple Retrieve(uint64_t ctx, int layer, F32Array q, int k, const std::string& method,
                     double cluster_budget, int beam) {
    if (q.ndim() != 2) throw py::value_error("q must be [q_heads, head_dim] float32");
    if (k < 1) throw py::value_error("k must be >= 1");
    kc::RetrieveOptions o;
    o.k = k;
    if (method == "flat") {
      o.method = kc::RetrieveMethod::kFlat;
    } else if (method == "graph") {
      o.method = kc::RetrieveMethod::kGraph;
    } else if (method != "wave") {
      throw py::value_error("method must be 'wave', 'flat' or 'graph'");
    }
    o.cluster_budget = cluster_budget;
    o.beam = beam;
    I64Array positions({q.shape(0), static_cast<py::ssize_t>(k)});
    F32Array scores({q.shape(0), static_cast<py::ssize_t>(k)});
    kc::RetrieveStats stats;
    {
      std::span<int64_t> p(positions.mutable_data(), positions.size());
      std::span<float> s(scores.mutable_data(), scores.size());
      std::span<const float> qs(q.data(), q.size());
      Check(WithoutGil([&] { return client_->Retrieve(ctx, layer, qs, o, p, s, &stats); }));
    }
    return py::make_tuple(positions, scores, stats.keys_scored, stats.keys_total);
  }

  py::tuple Gather(uint64_t ctx, int layer, I64Array positions) {
    const kc::ContextInfo info = Value(WithoutGil([&] { return client_->Info(ctx); }));
    const int64_t n = positions.size();
    const auto dtype = info.shape.dtype == kvwave::DType::kF32   ? py::dtype("float32")
                       : info.shape.dtype == kvwave::DType::kF16 ? py::dtype("float16")
                                                                 : py::dtype("uint16");
    std::vector<py::ssize_t> shape = {n, info.shape.kv_heads, info.shape.head_dim};
    py::array k(dtype, shape), v(dtype, shape);
    {
      std::span<std::byte> ks(static_cast<std::byte*>(k.mutable_data()), k.nbytes());
      std::span<std::byte> vs(static_cast<std::byte*>(v.mutable_data()), v.nbytes());
      std::span<const int64_t> ps(positions.data(), n);
      Check(WithoutGil([&] { return client_->Gather(ctx, layer, ps, ks, vs); }));
    }
    return py::make_tuple(k, v);
  }

  void Close(uint64_t ctx) {
    Check(WithoutGil([&] { return client_->Close(ctx); }));
  }
  void Drop(uint64_t ctx) {
    Check(WithoutGil([&] { return client_->Drop(ctx); }));
  }
  py::dict Info(uint64_t ctx) {
    return InfoDict(Value(WithoutGil([&] { return client_->Info(ctx); })));
  }
  py::list Contexts() {
    py::list out;
    for (const auto& i : Value(WithoutGil([&] { return client_->ListContexts(); }))) {
      out.append(InfoDict(i));
    }
    return out;
  }
  py::dict Stats() {
    kc::ServerStats s = Value(WithoutGil([&] { return client_->Stats(); }));
    py::dict d, ops;
    for (const auto& o : s.ops) {
      py::dict e;
      e["count"] = o.count;
      e["errors"] = o.errors;
      e["p50_us"] = o.p50_us;
      e["p99_us"] = o.p99_us;
      e["p999_us"] = o.p999_us;
      ops[py::str(o.op)] = e;
    }
    d["ops"] = ops;
    d["sessions"] = s.sessions;
    d["contexts"] = s.contexts;
    d["memory_used_bytes"] = s.memory_used_bytes;
    d["memory_limit_bytes"] = s.memory_limit_bytes;
    d["rss_bytes"] = s.rss_bytes;
    d["frames_rejected"] = s.frames_rejected;
    d["tokens_appended"] = s.tokens_appended;
    d["host_pool_idle_bytes"] = s.host_pool_idle_bytes;
    d["host_pool_limit_bytes"] = s.host_pool_limit_bytes;
    d["prometheus_text"] = s.prometheus_text;
    return d;
  }
  bool shared_memory() const { return client_->uses_shared_memory(); }
  uint64_t session_id() const { return client_->session_id(); }

 private:
  std::unique_ptr<kc::Client> client_;
};

}  // namespace

PYBIND11_MODULE(kvwave, m) {
  m.doc() = "kvwave client: talk to kvwaved (KV-cache store) with numpy arrays";
  g_error = PyErr_NewExceptionWithDoc("kvwave.Error",
                                      "A kvwaved call failed (the message names its status).",
                                      PyExc_RuntimeError, nullptr);
  g_resource_exhausted =
      PyErr_NewExceptionWithDoc("kvwave.ResourceExhaustedError",
                                "kvwaved refused a call at one of its limits.", g_error, nullptr);
  m.add_object("Error", py::handle(g_error));
  m.add_object("ResourceExhaustedError", py::handle(g_resource_exhausted));
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusError& e) {
      PyErr_SetString(ExceptionType(e.code()), e.what());
    }
  });
  py::class_<PyClient>(m, "Client")
      .def(py::init<const std::string&, size_t, const std::string&, int, const std::string&, int,
                    std::vector<std::string>>(),
           py::arg("socket_path") = "/tmp/kvwaved.sock",
           py::arg("shared_memory_bytes") = size_t{64} << 20, py::arg("tcp_host") = "127.0.0.1",
           py::arg("tcp_port") = 0, py::arg("token") = "", py::arg("deadline_ms") = 0,
           py::arg("credentials") = std::vector<std::string>{},
           "credentials: trust-model tokens presented at connect (trust.admin_token, a "
           "namespace's write_token or read_token); connecting fails if one matches none.")
      .def("ping", &PyClient::Ping)
      .def("open", &PyClient::Open, py::arg("layers"), py::arg("q_heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("dtype") = "f16",
           py::arg("token_ids") = std::vector<int32_t>{}, py::arg("prefix_namespace") = "",
           "Opens a context; returns (context_id, matched_tokens).")
      .def("append", &PyClient::Append, py::arg("ctx"), py::arg("layer"), py::arg("k"),
           py::arg("v"), py::arg("q") = py::none(),
           "k, v: [n, kv_heads, head_dim] arrays of the context's dtype; q: optional prefill "
           "queries of the same tokens [n, q_heads, head_dim] float32, kept for the "
           "RetrievalAttention graph of their segment (index.graph = on)")
      .def("seal", &PyClient::Seal, py::arg("ctx"))
      .def("attend", &PyClient::Attend, py::arg("ctx"), py::arg("layer"), py::arg("q"),
           py::arg("retrieval_budget") = -1.0, py::arg("estimation_budget") = -1.0,
           py::arg("method") = "default", py::arg("graph_top_k") = 0, py::arg("beam") = 0,
           "q: [q_heads, head_dim] float32; method: 'default' (the server's attend.method), "
           "'retroinfer' or 'retrievalattention' (graph_top_k tokens per query head, beam per "
           "segment; 0 = the server's defaults); returns (out [q_heads, head_dim], lse "
           "[q_heads], stats dict)")
      .def("attend_batch", &PyClient::AttendBatch, py::arg("layer"), py::arg("ctxs"), py::arg("q"),
           py::arg("budgets") = std::vector<std::pair<double, double>>{},
           "one layer of a decode step of several contexts in one round trip: q [B, q_heads, "
           "head_dim] float32 (row b for ctxs[b]); budgets: [(retrieval, estimation)] per "
           "context or none (the server's defaults); returns (out [B, q_heads, head_dim], lse "
           "[B, q_heads], [stats dict])")
      .def("register_device_buffers", &PyClient::RegisterDeviceBuffers, py::arg("q_ptr"),
           py::arg("q_bytes"), py::arg("out_ptr"), py::arg("out_bytes"), py::arg("lse_ptr"),
           py::arg("lse_bytes"),
           "registers three float32 device buffers of this process (device pointers as ints) and "
           "an interprocess event pair with kvwaved; returns the registration id "
           "(kvwave_torch.DeviceAttention does this for torch tensors)")
      .def("register_device_handles", &PyClient::RegisterDeviceHandles, py::arg("device_uuid"),
           py::arg("q"), py::arg("out"), py::arg("lse"), py::arg("q_ready"), py::arg("out_ready"),
           "registers CUDA IPC handles made elsewhere: buffers as (handle bytes, offset, bytes)")
      .def("unregister_device_buffers", &PyClient::UnregisterDeviceBuffers, py::arg("registration"))
      .def("attend_device", &PyClient::AttendDevice, py::arg("registration"), py::arg("layer"),
           py::arg("ctxs"), py::arg("q_offset"), py::arg("out_offset"), py::arg("lse_offset"),
           py::arg("stream"), py::arg("budgets") = std::vector<std::pair<double, double>>{},
           "one layer of a decode step on device tensors: q [B, q_heads, head_dim] at q_offset "
           "(bytes) of the registration's q buffer, out and lse written at their offsets, ordered "
           "on `stream` (a cudaStream_t as int); returns [stats dict]")
      .def("retrieve", &PyClient::Retrieve, py::arg("ctx"), py::arg("layer"), py::arg("q"),
           py::arg("k") = 100, py::arg("method") = "wave", py::arg("cluster_budget") = -1.0,
           py::arg("beam") = 0,
           "returns (positions [q_heads, k] int64, scores [q_heads, k] float32, keys_scored, "
           "keys_total)")
      .def("gather", &PyClient::Gather, py::arg("ctx"), py::arg("layer"), py::arg("positions"),
           "returns (k, v) [n, kv_heads, head_dim] of the context's dtype")
      .def("close", &PyClient::Close, py::arg("ctx"))
      .def("drop", &PyClient::Drop, py::arg("ctx"))
      .def("info", &PyClient::Info, py::arg("ctx"))
      .def("contexts", &PyClient::Contexts)
      .def("stats", &PyClient::Stats)
      .def_property_readonly("shared_memory", &PyClient::shared_memory)
      .def_property_readonly("session_id", &PyClient::session_id);
}
