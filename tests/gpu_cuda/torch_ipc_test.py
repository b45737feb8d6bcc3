#!/usr/bin/env python3
"""Python + torch through kvwaved with device tensors (issue 17), on a GPU machine: a decode chain
of layers on torch's current stream (each layer's query made from the previous layer's output,
out poisoned with NaN before each call, no host synchronisation until the end) through
kvwave_torch.DeviceAttention, over the ctypes client (client/python/kvwave_ctypes.py:
libkvwave_c.so, any Python version). Then each layer's recorded query through the host path of
the same daemon: equal bit for bit (so the daemon read the query after "q ready" and the stream
read the output after "out ready"); at a 100% budget also equal to float64 attention in torch.
Env: KVWAVED (binary), KVWAVE_C_LIB, KVWAVE_TEST_SEED. Prints SKIP without a GPU."""
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../client/python"))
import kvwave_ctypes  # noqa: E402
import kvwave_torch  # noqa: E402

if not torch.cuda.is_available():
    print("SKIP: no CUDA device")
    sys.exit(0)
seed = int(os.environ.get("KVWAVE_TEST_SEED", random.randrange(1 << 31)))
print(f"seed {seed} (KVWAVE_TEST_SEED)")
torch.manual_seed(seed)
L, HQ, HKV, D, T = 4, 8, 2, 128, 20000

sock = tempfile.mkdtemp() + "/kvwaved.sock"
r, w = os.pipe()
proc = subprocess.Popen([os.environ["KVWAVED"], "--ready-fd", str(w), "--set",
                         "rpc.socket_path=" + sock, "--set", "gpu.mode=on", "--set",
                         "log.level=warn"], pass_fds=(w,))
os.close(w)
assert os.read(r, 100).startswith(b"ready"), "kvwaved did not start"
failures = 0
try:
    c = kvwave_ctypes.Client(sock, 128 << 20)
    ctx = c.open(L, HQ, HKV, D, "bf16")
    ks = [torch.randn(T, HKV, D).to(torch.bfloat16) for _ in range(L)]
    vs = [torch.randn(T, HKV, D).to(torch.bfloat16) for _ in range(L)]
    for l in range(L):
        for a in range(0, T, 4096):
            c.append(ctx, l, ks[l][a:a + 4096].view(torch.int16).numpy(),
                     vs[l][a:a + 4096].view(torch.int16).numpy())
    c.seal(ctx)
    att = kvwave_torch.DeviceAttention(c, HQ, D, max_batch=1)
    for budget in [None, (1.0, 0.0)]:
        h = torch.randn(1, HQ, D, device="cuda")
        qs, outs, lses = [], [], []
        for l in range(L):  # one decode step: no host synchronisation in this loop
            q = torch.tanh(h) * 3.0
            att.out.fill_(float("nan"))
            out, lse = att.attend([ctx], l, q, budgets=[budget] if budget else None)
            qs.append(q.clone())
            outs.append(out.clone())
            lses.append(lse.clone())
            h = h + out
        torch.cuda.synchronize()
        for l in range(L):
            ho, hl = c.attend(ctx, l, qs[l][0].cpu().numpy(),
                              *(budget if budget else (-1.0, -1.0)))
            same = np.array_equal(outs[l][0].cpu().numpy().view(np.uint32), ho.view(np.uint32)) \
                and np.array_equal(lses[l][0].cpu().numpy().view(np.uint32), hl.view(np.uint32))
            msg = f"budget {budget or 'default'} layer {l}: device == host path bit for bit: {same}"
            if budget:
                k = ks[l].double().repeat_interleave(HQ // HKV, dim=1)  # [T, HQ, D]
                v = vs[l].double().repeat_interleave(HQ // HKV, dim=1)
                qd = qs[l][0].double().cpu()
                s = torch.einsum("hd,thd->ht", qd, k) / D ** 0.5
                ref = torch.einsum("ht,thd->hd", torch.softmax(s, dim=1), v)
                rel = ((outs[l][0].double().cpu() - ref).norm() / ref.norm()).item()
                lse_err = (lses[l][0].double().cpu() - torch.logsumexp(s, dim=1)).abs().max().item()
                msg += f"; vs float64: rel {rel:.2e}, lse max err {lse_err:.2e}"
                same = same and rel < 1e-4 and lse_err < 1e-3
            print(msg)
            failures += 0 if same else 1
    att.close()
    c.close_client()
finally:
    proc.terminate()
    proc.wait(timeout=60)
print("PASS" if failures == 0 else f"FAIL ({failures})")
sys.exit(1 if failures else 0)
