"""The ctypes client (client/python/kvwave_ctypes.py over libkvwave_c.so, for Pythons the built
module does not match) against the real kvwaved: Attend with its statistics at 100% equals float64
attention, Close releases the context and a closed context is a clear error."""
import os
import sys

import numpy as np
import pytest

BINARY_DIR = os.environ.get("KVWAVE_BINARY_DIR", os.path.join(os.path.dirname(__file__), "../../build"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../client/python"))
import kvwave_ctypes  # noqa: E402

LIB = os.path.join(BINARY_DIR, "client", "libkvwave_c.so")


@pytest.fixture
def cclient(daemon):
    if not os.path.exists(LIB):
        pytest.skip(f"{LIB} not built")
    c = kvwave_ctypes.Client(daemon, 8 << 20, library=LIB)
    yield c
    c.close_client()


def test_attend_stats_and_close(cclient):
    seed = np.random.SeedSequence().entropy % (2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    n, hq, hkv, d = 1500, 8, 2, 64
    ctx = cclient.open(1, hq, hkv, d, "f16")
    k = rng.standard_normal((n, hkv, d)).astype(np.float16)
    v = rng.standard_normal((n, hkv, d)).astype(np.float16)
    cclient.append(ctx, 0, k, v)
    cclient.seal(ctx)
    q = (0.5 * rng.standard_normal((hq, d))).astype(np.float32)
    out, lse, st = cclient.attend_stats(ctx, 0, q, 1.0, 0.0)
    g = hq // hkv
    ref = np.zeros((hq, d))
    ref_lse = np.zeros(hq)
    for h in range(hq):
        s = k[:, h // g, :].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(d)
        w = np.exp(s - s.max())
        ref[h] = (w[:, None] * v[:, h // g, :].astype(np.float64)).sum(0) / w.sum()
        ref_lse[h] = s.max() + np.log(w.sum())
    assert np.abs(out - ref).max() < 1e-4
    assert np.abs(lse - ref_lse).max() < 1e-4
    # Every token attended exactly at 100%: per KV head, steady + retrieved = n.
    assert st["steady_tokens"] + st["retrieved_tokens"] == n * hkv, st
    assert st["estimated_clusters"] == 0, st
    out2, lse2 = cclient.attend(ctx, 0, q, 1.0, 0.0)  # the stats-less call: the same numbers
    assert np.array_equal(out2, out) and np.array_equal(lse2, lse)
    cclient.close(ctx)
    with pytest.raises(kvwave_ctypes.Error, match="context"):
        cclient.attend(ctx, 0, q)
    with pytest.raises(kvwave_ctypes.Error):
        cclient.close(ctx)
