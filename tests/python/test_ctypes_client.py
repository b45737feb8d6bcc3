"""The ctypes client (client/python/kvwave_ctypes.py over libkvwave_c.so, for Pythons the built
module does not match) against the real kvwaved: Attend with its statistics at 100% equals float64
attention, Close releases the context and a closed context is a clear error. The checks run in a
child interpreter: libkvwave_c.so and the `kvwave` module (loaded by the other tests of this
process) each carry the client and its protobuf descriptors, which may be registered only once a
process."""
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BINARY_DIR = os.environ.get("KVWAVE_BINARY_DIR", os.path.join(HERE, "../../build"))
LIB = os.path.join(BINARY_DIR, "client", "libkvwave_c.so")


def test_attend_stats_and_close(daemon):
    if not os.path.exists(LIB):
        pytest.skip(f"{LIB} not built")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), daemon, LIB], capture_output=True,
                       text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ctypes client: ok" in r.stdout


def check(socket_path, lib):
    sys.path.insert(0, os.path.join(HERE, "../../client/python"))
    import kvwave_ctypes
    seed = np.random.SeedSequence().entropy % (2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    c = kvwave_ctypes.Client(socket_path, 8 << 20, library=lib)
    n, hq, hkv, d = 1500, 8, 2, 64
    ctx = c.open(1, hq, hkv, d, "f16")
    k = rng.standard_normal((n, hkv, d)).astype(np.float16)
    v = rng.standard_normal((n, hkv, d)).astype(np.float16)
    c.append(ctx, 0, k, v)
    c.seal(ctx)
    q = (0.5 * rng.standard_normal((hq, d))).astype(np.float32)
    out, lse, st = c.attend_stats(ctx, 0, q, 1.0, 0.0)
    g = hq // hkv
    ref, ref_lse = np.zeros((hq, d)), np.zeros(hq)
    for h in range(hq):
        s = k[:, h // g, :].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(d)
        w = np.exp(s - s.max())
        ref[h] = (w[:, None] * v[:, h // g, :].astype(np.float64)).sum(0) / w.sum()
        ref_lse[h] = s.max() + np.log(w.sum())
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()
    assert np.abs(lse - ref_lse).max() < 1e-4, np.abs(lse - ref_lse).max()
    # Every token attended exactly at 100%: per KV head, steady + retrieved = n.
    assert st["steady_tokens"] + st["retrieved_tokens"] == n * hkv, st
    assert st["estimated_clusters"] == 0, st
    out2, lse2 = c.attend(ctx, 0, q, 1.0, 0.0)  # the stats-less call: the same numbers
    assert np.array_equal(out2, out) and np.array_equal(lse2, lse)
    c.close(ctx)
    for call in (lambda: c.attend(ctx, 0, q), lambda: c.close(ctx)):
        try:
            call()
        except kvwave_ctypes.Error as e:
            assert "context" in str(e), e
        else:
            raise AssertionError("a closed context was accepted")
    c.close_client()
    print("ctypes client: ok")


if __name__ == "__main__":
    check(sys.argv[1], sys.argv[2])
