#!/usr/bin/env python3
"""Writes seed inputs for rpc_handler_fuzzer (format in rpc/fuzz/handler_fuzzer.cc) into DIR:
whole sessions (open, append, attend, retrieve, gather, seal, info, close, ...) over a shared
region and inline, f32 / f16 / bf16, with and without token ids (shared prefixes).
usage: handler_seeds.py DIR"""
import os
import struct
import sys

OPS = ["PING", "STATS", "OPEN", "APPEND", "SEAL", "ATTEND", "RETRIEVE", "GATHER", "CLOSE",
       "INFO", "LIST", "DROP", "UNKNOWN", "ATTEND_BATCH", "REGISTER_DEVICE", "UNREGISTER_DEVICE",
       "ATTEND_DEVICE"]  # the order of kOps in handler_fuzzer.cc


def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    if isinstance(value, bytes):
        return varint(num << 3 | 2) + varint(len(value)) + value
    if isinstance(value, float):
        return varint(num << 3 | 1) + struct.pack("<d", value)
    return varint(num << 3) + varint(value)


def tensor(offset=None, length=None, data=None):
    out = b""
    if offset is not None:
        out += field(1, offset) + field(2, length)
    if data is not None:
        out += field(3, data)
    return out


def record(op, body, raw=False):
    sel = OPS.index(op) | (0x80 if raw else 0)
    return bytes([sel]) + struct.pack("<H", len(body)) + body


def shape(layers, q, kv, dim, dtype):
    return field(1, layers) + field(2, q) + field(3, kv) + field(4, dim) + field(5, dtype)


def session(region, dtype, ids, layers=2, q=4, kv=2, dim=8, tokens=40, graph=False):
    """graph: the session goes to the fuzzer's second engine (graphs on, two-pass ranking),
    appends prefill queries with its K/V and asks for graph Retrieve and retrievalattention."""
    esize = 4 if dtype == 0 else 2
    row = kv * dim * esize
    region_bytes = 255 * 64
    fill = bytes((i * 37 + 11) % 120 for i in range(region_bytes))  # small finite values
    recs = []
    open_body = field(1, shape(layers, q, kv, dim, dtype))
    if ids:
        open_body += field(2, b"".join(varint(i) for i in range(ids)))  # packed token ids
        open_body += field(3, b"docs")
    recs.append(record("OPEN", open_body))
    kv_bytes = tokens * row

    def t(off, length):
        if region:
            return tensor(off, length)
        return tensor(data=fill[off:off + length])

    for layer in range(layers):
        append = (field(1, 0) + field(2, layer) + field(3, tokens) + field(4, t(0, kv_bytes)) +
                  field(5, t(kv_bytes, kv_bytes)))
        if graph:  # float32 queries [tokens x q x dim]: the fill bytes read as small finite floats
            append += field(6, t(0, tokens * q * dim * 4))
        recs.append(record("APPEND", append))
    qb = q * dim * 4
    att = field(1, 0) + field(2, 0) + field(3, t(0, qb)) + field(4, 0.5) + field(5, 0.25)
    if region:
        att += field(6, tensor(8192, qb)) + field(7, tensor(8192 + qb, q * 4))
    if graph:
        att += field(8, 2) + field(9, 4)  # retrievalattention, graph_top_k 4
    recs.append(record("ATTEND", att))
    entry = field(1, 0) + field(2, 0.5) + field(3, 0.25)
    batch = field(1, 1 if layers > 1 else 0) + field(2, entry) + field(3, t(0, qb))
    if region:
        batch += field(4, tensor(8192, qb)) + field(5, tensor(8192 + qb, q * 4))
    recs.append(record("ATTEND_BATCH", batch))
    # The GPU-client ops: without a GPU backend each is refused (the fuzzer checks the reply).
    buf = field(1, b"\x01" * 64) + field(2, 4096)
    recs.append(record("REGISTER_DEVICE", field(1, b"\x00" * 16) + field(2, buf) + field(3, buf) +
                       field(4, buf) + field(5, b"\x02" * 64) + field(6, b"\x03" * 64)))
    recs.append(record("ATTEND_DEVICE", field(1, 1) + field(2, 0) + field(3, entry)))
    recs.append(record("UNREGISTER_DEVICE", field(1, 1)))
    ret = field(1, 0) + field(2, 1) + field(3, t(0, qb)) + field(4, 5) + field(5, 2 if graph else 1)
    if region:
        ret += field(7, tensor(9216, q * 5 * 8)) + field(8, tensor(10240, q * 5 * 4))
    recs.append(record("RETRIEVE", ret))
    gat = field(1, 0) + field(2, 0) + field(3, tensor(data=struct.pack("<qq", 1, 3)))
    if region:
        gat += field(4, tensor(11264, 2 * row)) + field(5, tensor(12288, 2 * row))
    recs.append(record("GATHER", gat))
    recs.append(record("SEAL", field(1, 0)))
    recs.append(record("INFO", field(1, 0)))
    recs.append(record("LIST", b""))
    recs.append(record("STATS", b""))
    recs.append(record("PING", field(1, b"hi")))
    recs.append(record("CLOSE", field(1, 0)))
    recs.append(record("DROP", field(1, 0)))
    head = bytes([(1 if region else 0) | (2 if graph else 0), region_bytes // 64 if region else 0])
    return head + (fill if region else b"") + b"".join(recs)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    seeds = {
        "shm_f32": session(True, 0, 0),
        "shm_f16_prefix": session(True, 1, 130, tokens=72),
        "inline_bf16": session(False, 2, 0),
        "inline_f32_prefix": session(False, 0, 200, layers=1, kv=1, q=2, tokens=80),
        "shm_f16_graph": session(True, 1, 0, tokens=72, graph=True),
        "inline_f32_graph_prefix": session(False, 0, 140, layers=1, kv=1, q=2, tokens=80,
                                           graph=True),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
