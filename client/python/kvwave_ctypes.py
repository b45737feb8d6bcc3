"""kvwave's client through its C ABI (libkvwave_c.so, client/capi/kvwave_c.h) with ctypes: for a
Python that the built `kvwave` module does not match (it is compiled for one Python version).
The methods a decode loop needs, with the `kvwave` module's signatures where they overlap, so
kvwave_torch.DeviceAttention takes either client."""

import ctypes
import os

import numpy as np

_u64, _i64, _sz, _ptr = ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p


class Error(RuntimeError):
    pass


def _load(path):
    lib = ctypes.CDLL(path)
    lib.kvwave_last_error.restype = ctypes.c_char_p
    lib.kvwave_connect.restype = _ptr
    lib.kvwave_connect.argtypes = [ctypes.c_char_p, _sz]
    lib.kvwave_disconnect.argtypes = [_ptr]
    lib.kvwave_open.restype = _u64
    lib.kvwave_open.argtypes = [_ptr] + [ctypes.c_int] * 5
    lib.kvwave_append.argtypes = [_ptr, _u64, ctypes.c_int, _i64, _ptr, _ptr, _sz]
    lib.kvwave_seal.argtypes = [_ptr, _u64]
    lib.kvwave_close.argtypes = [_ptr, _u64]
    lib.kvwave_attend_stats.argtypes = [_ptr, _u64, ctypes.c_int, _ptr, _sz, ctypes.c_double,
                                        ctypes.c_double, _ptr, _ptr, _ptr]
    lib.kvwave_attend.argtypes = [_ptr, _u64, ctypes.c_int, _ptr, _sz, ctypes.c_double,
                                  ctypes.c_double, _ptr, _ptr]
    lib.kvwave_register_device_buffers.restype = _u64
    lib.kvwave_register_device_buffers.argtypes = [_ptr, _sz, _sz, _sz, _sz, _sz, _sz]
    lib.kvwave_unregister_device_buffers.argtypes = [_ptr, _u64]
    lib.kvwave_attend_device.argtypes = [_ptr, _u64, ctypes.c_int, ctypes.POINTER(_u64), _sz,
                                         _u64, _u64, _u64, ctypes.c_double, ctypes.c_double, _sz]
    return lib


class Client:
    DTYPES = {"f32": 0, "f16": 1, "bf16": 2}

    def __init__(self, socket_path, shared_memory_bytes=64 << 20, library=None):
        path = library or os.environ.get("KVWAVE_C_LIB", "libkvwave_c.so")
        self._lib = _load(path)
        self._c = self._lib.kvwave_connect(socket_path.encode(), shared_memory_bytes)
        if not self._c:
            raise Error(self._err())

    def _err(self):
        return self._lib.kvwave_last_error().decode()

    def _check(self, rc):
        if rc != 0:
            raise Error(self._err())

    def close_client(self):
        if self._c:
            self._lib.kvwave_disconnect(self._c)
            self._c = None

    def open(self, layers, q_heads, kv_heads, head_dim, dtype="bf16"):
        ctx = self._lib.kvwave_open(self._c, layers, q_heads, kv_heads, head_dim,
                                    self.DTYPES[dtype])
        if ctx == 0:
            raise Error(self._err())
        self._q_heads = q_heads
        return ctx

    def append(self, ctx, layer, k, v):
        """k, v: numpy arrays [n, kv_heads, head_dim] of the context's element size."""
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
        self._check(self._lib.kvwave_append(self._c, ctx, layer, k.shape[0], k.ctypes.data,
                                            v.ctypes.data, k.nbytes))

    def seal(self, ctx):
        self._check(self._lib.kvwave_seal(self._c, ctx))

    def close(self, ctx):
        self._check(self._lib.kvwave_close(self._c, ctx))

    def attend(self, ctx, layer, q, retrieval=-1.0, estimation=-1.0):
        out, lse, _ = self.attend_stats(ctx, layer, q, retrieval, estimation)
        return out, lse

    STATS = ("steady_tokens", "retrieved_tokens", "retrieved_clusters", "estimated_clusters",
             "total_clusters", "scored_tokens", "graph_keys_scored")

    def attend_stats(self, ctx, layer, q, retrieval=-1.0, estimation=-1.0):
        """attend, and the call's statistics as a dict (the `kvwave` module's keys)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty_like(q)
        lse = np.empty(q.shape[0], np.float32)
        st = np.zeros(len(self.STATS), np.int64)
        self._check(self._lib.kvwave_attend_stats(self._c, ctx, layer, q.ctypes.data, q.size,
                                                  retrieval, estimation, out.ctypes.data,
                                                  lse.ctypes.data, st.ctypes.data))
        return out, lse, dict(zip(self.STATS, (int(x) for x in st)))

    def register_device_buffers(self, q_ptr, q_bytes, out_ptr, out_bytes, lse_ptr, lse_bytes):
        reg = self._lib.kvwave_register_device_buffers(self._c, q_ptr, q_bytes, out_ptr,
                                                       out_bytes, lse_ptr, lse_bytes)
        if reg == 0:
            raise Error(self._err())
        return reg

    def unregister_device_buffers(self, registration):
        self._check(self._lib.kvwave_unregister_device_buffers(self._c, registration))

    def attend_device(self, registration, layer, ctxs, q_offset, out_offset, lse_offset, stream,
                      budgets=()):
        if budgets and len(set(budgets)) != 1:
            raise ValueError("this client takes one budget pair for the whole batch")
        r, e = budgets[0] if budgets else (-1.0, -1.0)
        arr = (_u64 * len(ctxs))(*ctxs)
        self._check(self._lib.kvwave_attend_device(self._c, registration, layer, arr, len(ctxs),
                                                   q_offset, out_offset, lse_offset, r, e,
                                                   stream))
        return []
