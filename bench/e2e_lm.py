#!/usr/bin/env python3
"""End to end: the real language model of ../shared/data/lm decodes with kvwave as its KV backend.

The model prefills C tokens; every layer's K/V goes into a running kvwaved through the Python client.
Then, for the next S tokens (teacher forcing), each layer computes its query, appends the new token's
K/V, and takes its attention output from kvwave (Attend, or top-k attention over Retrieve's tokens)
instead of computing it itself -- as an inference server would. The loss over those S positions and
the greedy next token are compared with the model's own full attention over the same tokens.

    python3 bench/e2e_lm.py --tokens FILE.u16 --context C --steps S --json OUT [--socket PATH]
                            [--offset FIRST_TOKEN] [--methods all|NAME[@KEY=VALUE...],...]

Besides the named rows, tripartite-R-E and tripartite-R-rest run Attend at any budgets (e.g.
tripartite-0.024-rest: 2.4% of the clusters retrieved, every other cluster estimated).

retrievalattention-K rows run Attend with attend.method = retrievalattention (steady zone + the
RetrievalAttention graphs' top K tokens per query head, exact, LSE-merged) on a kvwaved with
index.graph = on, the prefill queries appended with the prefill K/V (the graph of each sealed
segment is built from them); their key fractions count, per query head, the tokens attended exactly
(steady zone + its K) and the keys the graph searches scored.

A method name followed by @KEY=VALUE (e.g. tripartite-0.018-rest@attend.rank=two_pass) runs on a second
kvwaved started with those settings (one daemon per distinct set). Each row also reports the time of its
Attend calls (ms per call: one layer, all heads, client round trip included; comparable between rows of the
same run) and the keys a second ranking pass scored (attend.rank = two_pass), as a fraction of the keys.
"mem" is the daemon's memory for the context once sealed over the raw f16 K/V of its C tokens (clusters start
on page boundaries, so small clusters pad; the meta index adds a centroid and a value sum per cluster).

--device cuda (issue 17, on a GPU machine): the model runs on the GPU (prefill and decode); kvwaved is
started with gpu.mode=on and reached through the ctypes client (client/python/kvwave_ctypes.py over
libkvwave_c.so: any Python version; KVWAVED and KVWAVE_C_LIB name the binaries). Rows, same run:
full-gpu (the model's own attention per decode step: torch SDPA over a float32 KV cache in HBM holding
the same f16 prefill K/V that kvwave gets), kvwave-ipc (every
layer's attention from kvwaved through registered device tensors, kvwave_torch.DeviceAttention on
the current stream: no host copy of q or out), kvwave-host (the same daemon through host tensors:
q to the host, Attend over the memfd, out back), each at the defaults and kvwave-ipc also at a
100% budget (must match full-gpu closely). Append takes host tensors, so each kvwave row appends a
step's K/V after the step (one device-to-host copy of all layers' new K/V, then one Append per
layer), and kvwave attends over the positions before the step; the new token's own term is merged
on the GPU by log-sum-exp (exact). Times per decode step (all layers; median over the steps after
8): total, kvwave's attention (CUDA events around the call on the stream, so it includes waiting
for kvwaved), the appends (host clock, including the copy), and the model's own compute (the rest).

Needs numpy and torch (Debian: python3-numpy python3-torch, run with /usr/bin/python3), the built
Python binding (found under build*/), and, unless --socket names a running daemon, the built kvwaved.
The model definition is imported from ../shared/data/lm/qkdump.py (not copied here).
"""
import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LM = os.path.join(ROOT, '..', 'shared', 'data', 'lm')


def find_one(patterns, what):
    for pattern in patterns:
        hits = sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True), key=os.path.getmtime)
        if hits:
            return hits[-1]
    raise SystemExit(f'e2e_lm: cannot find {what} (build the project first: bash tests/run.sh)')


def import_binding():
    if os.environ.get('KVWAVE_PYTHONPATH'):
        sys.path.insert(0, os.environ['KVWAVE_PYTHONPATH'])
    else:
        sys.path.insert(0, os.path.dirname(find_one(['build*/**/kvwave*.so'], 'the kvwave Python module')))
    import kvwave  # noqa: E402  (built binding)
    return kvwave


class Daemon:
    """Starts kvwaved on a temporary socket unless one is given; stops it on exit."""

    def __init__(self, socket_path, settings=()):
        self.proc, self.dir = None, None
        self.socket = socket_path
        if socket_path:
            return
        binary = os.environ.get('KVWAVED') or find_one(['build*/**/rpc/kvwaved', 'build*/**/kvwaved'], 'kvwaved')
        self.dir = tempfile.mkdtemp(prefix='kvwave-e2e-')
        self.socket = os.path.join(self.dir, 'kvwaved.sock')
        extra = [a for kv in settings for a in ('--set', kv)]  # e.g. 'attend.retrieval_budget=0.05'
        # kvwaved writes "ready <pid>" to --ready-fd once it listens: wait on that, not on time.
        read_end, write_end = os.pipe()
        try:
            self.proc = subprocess.Popen([binary, '--ready-fd', str(write_end), '--set', f'rpc.socket_path={self.socket}',
                                          '--set', 'log.level=warn'] + extra, pass_fds=(write_end,),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            os.close(write_end)
        with os.fdopen(read_end, 'rb') as ready:
            line = ready.readline()
        if not line.startswith(b'ready '):
            self.proc.wait()
            raise SystemExit('e2e_lm: kvwaved exited: ' + self.proc.stderr.read().decode())

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def block_step(qk, block, x, cos, sin, attend):
    """One decoder block for one new token x [1, 1, dim]; attend(layer_q, k, v) -> [H, hd]."""
    import torch.nn.functional as F
    h = qk.rms(x, block.n1)
    q = block.wq(h).view(1, 1, block.H, block.hd).transpose(1, 2)
    k = block.wk(h).view(1, 1, block.KV, block.hd).transpose(1, 2)
    v = block.wv(h).view(1, 1, block.KV, block.hd).transpose(1, 2)
    q = qk.apply_rope(q, cos, sin)
    k = qk.apply_rope(k, cos, sin)
    o = attend(q[0, :, 0, :], k[0, :, 0, :], v[0, :, 0, :])
    x = x + block.wo(o.reshape(1, 1, -1))
    h = qk.rms(x, block.n2)
    return x + block.w2(F.silu(block.w1(h)) * block.w3(h))


def run_method(qk, torch, kv, client, model, cfg, tokens, prefill_kv, C, S, method, keep=False, prefill_q=None):
    """Decodes positions C..C+S-1 with one kvwave method; returns per-position logits [S, vocab].
    keep: leave the context open (method['ctx']) with each layer's last query (method['last_q']) for timing."""
    L, H, KV, hd = cfg['layers'], cfg['heads'], cfg['kv_heads'], cfg['dim'] // cfg['heads']
    g = H // KV
    mem_before = client.stats()['memory_used_bytes']
    ctx, _ = client.open(layers=L, q_heads=H, kv_heads=KV, head_dim=hd, dtype='f16')
    for layer, (k, v) in enumerate(prefill_kv):
        if method['kind'] == 'ra':  # the prefill queries go with their K/V: the graphs are built from them
            client.append(ctx, layer, k, v, q=np.ascontiguousarray(prefill_q[layer], dtype=np.float32))
        else:
            client.append(ctx, layer, k, v)
    client.seal(ctx)
    # The context's bytes once sealed (K/V rows with their page padding, the meta index, the tail),
    # over the raw f16 K/V of its C tokens.
    method['memory_ratio'] = (client.stats()['memory_used_bytes'] - mem_before) / (L * KV * C * hd * 2 * 2)
    cos_all, sin_all = qk.rope(C + S, hd, cfg['rope_base'], 'cpu')
    logits = []
    try:
        for s in range(S):
            p = C + s
            x = model.emb(torch.tensor([[tokens[p]]]))
            cos, sin = cos_all[p:p + 1], sin_all[p:p + 1]
            for layer, block in enumerate(model.blocks):
                def attend(q, k, v, layer=layer):
                    client.append(ctx, layer, k.numpy().astype(np.float16)[None], v.numpy().astype(np.float16)[None])
                    qn = np.ascontiguousarray(q.numpy(), dtype=np.float32)
                    method.setdefault('last_q', {})[layer] = qn
                    if method['kind'] == 'ra':
                        t = time.perf_counter()
                        out, _, st = client.attend(ctx, layer, qn, method='retrievalattention',
                                                   graph_top_k=method['top_k'], beam=method['beam'])
                        method['attend_s'] = method.get('attend_s', 0.0) + time.perf_counter() - t
                        method['attend_calls'] = method.get('attend_calls', 0) + 1
                        # Per query head: steady tokens are per KV head, retrieved/scored over query heads.
                        method['steady_tokens'] = method.get('steady_tokens', 0) + st['steady_tokens']
                        method['retrieved_tokens'] = method.get('retrieved_tokens', 0) + st['retrieved_tokens'] / g
                        method['scored_tokens'] = (method.get('scored_tokens', 0)
                                                   + max(0.0, st['graph_keys_scored'] / g - st['retrieved_tokens'] / g))
                        method['keys'] = method.get('keys', 0) + (p + 1) * KV
                        return torch.from_numpy(np.asarray(out, dtype=np.float32))
                    if method['kind'] == 'tripartite':
                        t = time.perf_counter()
                        out, _, st = client.attend(ctx, layer, qn, retrieval_budget=method['retrieval'],
                                                   estimation_budget=method['estimation'])
                        method['attend_s'] = method.get('attend_s', 0.0) + time.perf_counter() - t
                        method['attend_calls'] = method.get('attend_calls', 0) + 1
                        for key in ('steady_tokens', 'retrieved_tokens', 'scored_tokens'):
                            method[key] = method.get(key, 0) + st.get(key, 0)
                        method['keys'] = method.get('keys', 0) + (p + 1) * KV
                        return torch.from_numpy(np.asarray(out, dtype=np.float32))
                    pos, scores, _, _ = client.retrieve(ctx, layer, qn, k=method['k'], method=method['index'],
                                                        cluster_budget=method['cluster_budget'])
                    out = np.zeros((H, hd), np.float32)
                    for h in range(H):
                        keep = pos[h] >= 0
                        _, vv = client.gather(ctx, layer, np.ascontiguousarray(pos[h][keep]))
                        w = np.exp(scores[h][keep] - scores[h][keep].max())
                        out[h] = (w[:, None] * vv[:, h // g, :].astype(np.float32)).sum(0) / w.sum()
                    return torch.from_numpy(out)
                x = block_step(qk, block, x, cos, sin, attend)
            logits.append((qk.rms(x, model.nf) @ model.emb.weight.t())[0, 0])
    finally:
        if keep:
            method['ctx'] = ctx
        else:
            client.close(ctx)
    return torch.stack(logits)


def tripartite_method(name):
    """A row 'tripartite-R-E' or 'tripartite-R-rest' at any budgets (R, E fractions of the clusters;
    'rest' = every cluster not retrieved), or None when the name is not of that form."""
    m = re.fullmatch(r'tripartite-([0-9.]+)-(rest|[0-9.]+)', name)
    if not m:
        return None
    r = float(m.group(1))
    e = 1.0 - r if m.group(2) == 'rest' else float(m.group(2))
    if not (0.0 <= r <= 1.0 and 0.0 <= e <= 1.0 and r + e <= 1.0 + 1e-9):
        raise SystemExit(f'e2e_lm: {name}: budgets must be fractions that sum to at most 1')
    return {'name': name, 'kind': 'tripartite', 'retrieval': r, 'estimation': e}


def time_attends(clients, methods, layers, rounds):
    """Attend time per method, same run: round-robin over methods (so load drift hits all alike), each
    round one Attend per layer with that layer's last decode query on the method's kept context; returns
    {name: (median ms per call, calls)}. Client-side time: includes the socket round trip."""
    times = {m['name']: [] for m in methods if m['kind'] in ('tripartite', 'ra') and 'ctx' in m}
    for _ in range(rounds):
        for m in methods:
            if m['name'] not in times:
                continue
            client = clients[tuple(m['settings'])]
            for layer in range(layers):
                q = m['last_q'][layer]
                t = time.perf_counter()
                if m['kind'] == 'ra':
                    client.attend(m['ctx'], layer, q, method='retrievalattention', graph_top_k=m['top_k'],
                                  beam=m['beam'])
                else:
                    client.attend(m['ctx'], layer, q, retrieval_budget=m['retrieval'],
                                  estimation_budget=m['estimation'])
                times[m['name']].append(time.perf_counter() - t)
    return {k: (1e3 * float(np.median(v)), len(v)) for k, v in times.items() if v}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tokens', default=os.path.join(DEFAULT_LM, 'eval.u16'))
    ap.add_argument('--model', default=DEFAULT_LM, help='folder with qkdump.py and model-*.safetensors')
    ap.add_argument('--context', type=int, default=8192)
    ap.add_argument('--steps', type=int, default=256)
    ap.add_argument('--offset', type=int, default=0,
                    help='first token of the window (another stretch of the text: context + steps from there)')
    ap.add_argument('--json', default='')
    ap.add_argument('--socket', default='', help='a running kvwaved (default: start one)')
    ap.add_argument('--methods', default='all', help="'all', 'full' or comma list of method names")
    ap.add_argument('--threads', type=int, default=os.cpu_count(), help='torch CPU threads')
    ap.add_argument('--time-rounds', type=int, default=0,
                    help='after the rows: this many round-robin rounds of one Attend per layer per row, timed')
    ap.add_argument('--device', default='cpu', choices=('cpu', 'cuda'),
                    help='cuda: the model on the GPU, kvwave through device tensors (see above)')
    args = ap.parse_args()
    if args.device == 'cuda':
        return main_cuda(args)

    sys.path.insert(0, os.path.abspath(args.model))
    import torch
    import torch.nn.functional as F
    import qkdump as qk  # the model definition, imported from the shared data folder
    torch.set_num_threads(args.threads)
    kv = import_binding()
    tokens = np.fromfile(args.tokens, '<u2').astype(np.int64)[max(0, args.offset):]
    C, S = args.context, args.steps
    if len(tokens) < C + S + 1:
        raise SystemExit(f'e2e_lm: {args.tokens} has {len(tokens)} tokens, need {C + S + 1}')
    model, cfg = qk.load(args.model)
    model.eval()

    methods = [{'name': 'full', 'kind': 'tripartite', 'retrieval': 1.0, 'estimation': 0.0}]
    for r in (0.018, 0.05, 0.1):
        for e in (0.232, 0.0):
            methods.append({'name': f'tripartite-{r:g}-{e:g}', 'kind': 'tripartite', 'retrieval': r, 'estimation': e})
    for r in (0.018, 0.1):  # beyond the paper: estimate every cluster not retrieved
        methods.append({'name': f'tripartite-{r:g}-rest', 'kind': 'tripartite', 'retrieval': r, 'estimation': 1.0 - r})
    for k in (100, 1000):
        methods.append({'name': f'topk-wave-{k}', 'kind': 'topk', 'index': 'wave', 'k': k,
                        'cluster_budget': 0.05 if k == 100 else 0.25, 'retrieval': 0.0, 'estimation': 0.0})
    for k, beam in ((100, 128), (1000, 1024)):  # RetrievalAttention (issue 19)
        methods.append({'name': f'retrievalattention-{k}', 'kind': 'ra', 'top_k': k, 'beam': beam,
                        'retrieval': 0.0, 'estimation': 0.0, 'settings': ['index.graph=on']})
    if args.methods != 'all':
        known = {m['name']: m for m in methods}
        picked = []
        for name in args.methods.split(','):
            base, at, extra = name.partition('@')
            if base not in known:
                known[base] = tripartite_method(base)
            if known[base] is None:
                raise SystemExit(f'e2e_lm: unknown method {base!r} (known: {", ".join(known)})')
            picked.append(dict(known[base], name=name,
                               settings=known[base].get('settings', []) + [x for x in extra.split('@') if x]))
        methods = picked
    for m in methods:
        m.setdefault('settings', [])

    t0 = time.time()
    with torch.no_grad():
        idx = torch.from_numpy(tokens[:C + S + 1])[None]
        full_logits = model(idx[:, :C + S])[0, C:C + S]  # the model's own full attention
        targets = idx[0, C + 1:C + S + 1]
        full_loss = F.cross_entropy(full_logits.float(), targets).item()
        full_top1 = full_logits.argmax(-1)
        sink = []
        model(idx[:, :C], sink=sink, logits=False)
        prefill_kv = [(np.ascontiguousarray(k.numpy()), np.ascontiguousarray(v.numpy())) for _, k, v in sink]
        # [C, heads, hd] per layer, only when a row needs them (retrievalattention)
        prefill_q = ([q.numpy() for q, _, _ in sink] if any(m['kind'] == 'ra' for m in methods) else None)
        del sink
    print(f'# e2e_lm: C={C} S={S} offset={args.offset} model layers={cfg["layers"]} heads={cfg["heads"]}/{cfg["kv_heads"]} '
          f'full-attention loss {full_loss:.4f} ({time.time() - t0:.0f}s)', flush=True)

    daemons, clients = {}, {}
    rows = []
    try:
        for m in methods:
            key = tuple(m['settings'])
            if key not in daemons:
                if key and args.socket:
                    raise SystemExit('e2e_lm: methods with @settings start their own daemon (no --socket)')
                daemons[key] = Daemon(args.socket, list(key))
                clients[key] = kv.Client(socket_path=daemons[key].socket, shared_memory_bytes=256 << 20)
        print(f'{"method":44s} {"retrieval":>9s} {"estim.":>7s} {"loss":>8s} {"full":>8s} {"rel.incr":>9s} {"top1":>6s} '
              f'{"keys":>6s} {"scan":>6s} {"attend":>8s} {"mem":>5s} {"s":>5s}')
        for m in methods:
            client = clients[tuple(m['settings'])]
            t1 = time.time()
            with torch.no_grad():
                logits = run_method(qk, torch, kv, client, model, cfg, tokens, prefill_kv, C, S, m,
                                    keep=args.time_rounds > 0, prefill_q=prefill_q)
            loss = F.cross_entropy(logits.float(), targets).item()
            top1 = (logits.argmax(-1) == full_top1).float().mean().item()
            keys = m.get('keys', 0)
            exact = (m.get('steady_tokens', 0) + m.get('retrieved_tokens', 0)) / keys if keys else None
            scan = (m.get('steady_tokens', 0) + m.get('retrieved_tokens', 0) + m.get('scored_tokens', 0)) / keys if keys else None
            attend_ms = 1e3 * m['attend_s'] / m['attend_calls'] if m.get('attend_calls') else None
            rows.append({'method': m['name'], 'retrieval_budget': m['retrieval'], 'estimation_budget': m['estimation'],
                         'settings': m['settings'], 'loss': loss, 'full_loss': full_loss, 'top1_agreement': top1,
                         'exact_key_fraction': exact, 'scanned_key_fraction': scan, 'attend_ms': attend_ms,
                         'attend_calls': m.get('attend_calls', 0), 'memory_ratio': m.get('memory_ratio')})
            fmt = lambda x, f: (f % x) if x is not None else '-'  # noqa: E731
            print(f'{m["name"]:44s} {m["retrieval"]:9.3f} {m["estimation"]:7.3f} {loss:8.4f} {full_loss:8.4f} '
                  f'{(loss - full_loss) / full_loss:+9.4f} {top1:6.3f} {fmt(exact and exact * 100, "%5.2f%%"):>6s} '
                  f'{fmt(scan and scan * 100, "%5.2f%%"):>6s} {fmt(attend_ms, "%6.2fms"):>8s} '
                  f'{fmt(m.get("memory_ratio"), "%5.2f"):>5s} {time.time() - t1:5.0f}',
                  flush=True)
        if args.time_rounds > 0:
            timed = time_attends(clients, methods, cfg['layers'], args.time_rounds)
            print(f'# Attend time, {args.time_rounds} round-robin rounds x {cfg["layers"]} layers per row, each row on its '
                  f'context after its {S} decode steps (median ms per call, one layer, all heads, client round trip):')
            for row in rows:
                if row['method'] in timed:
                    row['attend_ms_median'], row['attend_timed_calls'] = timed[row['method']]
                    print(f'{row["method"]:44s} {row["attend_ms_median"]:7.3f} ms', flush=True)
    finally:
        clients.clear()
        for d in daemons.values():
            d.stop()
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


def main_cuda(args):
    """--device cuda: the rows of the module docstring; prints a table and writes --json."""
    sys.path.insert(0, os.path.abspath(args.model))
    sys.path.insert(0, os.path.join(ROOT, 'client', 'python'))
    import torch
    import torch.nn.functional as F
    import qkdump as qk  # the model definition, imported from the shared data folder
    import kvwave_ctypes
    import kvwave_torch
    if not torch.cuda.is_available():
        raise SystemExit('e2e_lm: --device cuda needs a CUDA device')
    dev = torch.device('cuda')
    tokens = np.fromfile(args.tokens, '<u2').astype(np.int64)[max(0, args.offset):]
    C, S = args.context, args.steps
    if len(tokens) < C + S + 1:
        raise SystemExit(f'e2e_lm: {args.tokens} has {len(tokens)} tokens, need {C + S + 1}')
    model, cfg = qk.load(args.model)
    model = model.to(dev).eval()
    L, H, KV = cfg['layers'], cfg['heads'], cfg['kv_heads']
    hd = cfg['dim'] // H
    g = H // KV
    t0 = time.time()
    with torch.no_grad():
        idx = torch.from_numpy(tokens[:C + S + 1])[None].to(dev)
        full_logits = model(idx[:, :C + S])[0, C:C + S].float()  # the model's own full attention
        targets = idx[0, C + 1:C + S + 1]
        full_loss = F.cross_entropy(full_logits, targets).item()
        full_top1 = full_logits.argmax(-1)
        sink = []
        model(idx[:, :C], sink=sink, logits=False)  # per layer (q, k, v) [C, heads, hd], f16, on the host
        prefill_kv = [(k.numpy(), v.numpy()) for _, k, v in sink]
        del sink
    torch.cuda.synchronize()
    print(f'# e2e_lm --device cuda ({torch.cuda.get_device_name()}, torch {torch.__version__}): C={C} S={S} '
          f'offset={args.offset} layers={L} heads={H}/{KV} hd={hd}; full-attention loss {full_loss:.4f} '
          f'({time.time() - t0:.0f}s)', flush=True)
    cos_all, sin_all = qk.rope(C + S, hd, cfg['rope_base'], dev)

    def decode(attend_fn, append_fn):
        """Teacher-forced decode of positions C..C+S-1; attend_fn(layer, q [H, hd], k, v [KV, hd], p) -> [H, hd]
        on the GPU; append_fn(list of (k, v) per layer) after each step. Returns logits [S, vocab] and per-step
        (total, attention, append) ms."""
        logits, times = [], []
        for s in range(S):
            p = C + s
            ev, kvs = [], []  # (start, end) CUDA events around each layer's attention; the step's K/V
            torch.cuda.synchronize()
            t = time.perf_counter()
            x = model.emb(idx[:, p:p + 1])
            cos, sin = cos_all[p:p + 1], sin_all[p:p + 1]
            for layer, block in enumerate(model.blocks):
                h = qk.rms(x, block.n1)
                q = qk.apply_rope(block.wq(h).view(1, 1, H, hd).transpose(1, 2), cos, sin)[0, :, 0, :]
                k = qk.apply_rope(block.wk(h).view(1, 1, KV, hd).transpose(1, 2), cos, sin)[0, :, 0, :]
                v = block.wv(h).view(1, 1, KV, hd).transpose(1, 2)[0, :, 0, :]
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                o = attend_fn(layer, q, k, v, p)
                e1.record()
                ev.append((e0, e1))
                kvs.append((k, v))
                x = x + block.wo(o.reshape(1, 1, -1))
                h = qk.rms(x, block.n2)
                x = x + block.w2(F.silu(block.w1(h)) * block.w3(h))
            logits.append((qk.rms(x, model.nf) @ model.emb.weight.t())[0, 0].float())
            torch.cuda.synchronize()
            compute = time.perf_counter() - t
            ta = time.perf_counter()
            if append_fn is not None:
                append_fn(kvs)
            append = time.perf_counter() - ta
            times.append((1e3 * (compute + append), sum(a.elapsed_time(b) for a, b in ev), 1e3 * append))
        return torch.stack(logits), times

    rows = []
    daemon = Daemon(args.socket, ['gpu.mode=on'])
    try:
        client = kvwave_ctypes.Client(daemon.socket, 256 << 20)
        att = kvwave_torch.DeviceAttention(client, H, hd, max_batch=1)

        def kvwave_row(path, budget):
            ctx = client.open(L, H, KV, hd, 'f16')
            for layer, (k, v) in enumerate(prefill_kv):
                for a in range(0, C, 8192):
                    client.append(ctx, layer, k[a:a + 8192], v[a:a + 8192])
            client.seal(ctx)

            def append(kvs):  # one device-to-host copy a step, then one Append per layer
                kv16 = torch.stack([torch.stack([k, v]) for k, v in kvs]).to(torch.float16).cpu().numpy()
                for layer in range(L):
                    client.append(ctx, layer, kv16[layer, 0][None], kv16[layer, 1][None])

            def attend(layer, q, k, v, p):
                # kvwave attends over positions < p (this step's K/V are appended after the step); the
                # new token's own term is merged here by log-sum-exp, exactly.
                if path == 'ipc':
                    out, lse = att.attend([ctx], layer, q.float()[None], budgets=[budget] if budget else None)
                    out, lse = out[0], lse[0]
                else:
                    r, e = budget if budget else (-1.0, -1.0)
                    o_h, l_h = client.attend(ctx, layer, q.float().cpu().numpy(), r, e)
                    out, lse = torch.from_numpy(o_h).to(dev), torch.from_numpy(l_h).to(dev)
                kk, vv = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)  # [H, hd]
                s_new = (q * kk).sum(-1) / math.sqrt(hd)
                m = torch.maximum(lse, s_new)
                a, b = torch.exp(lse - m), torch.exp(s_new - m)
                return (out * a[:, None] + vv * b[:, None]) / (a + b)[:, None]
            try:
                return decode(attend, append)
            finally:
                client.close(ctx)

        def full_row():
            caches = [(torch.zeros(KV, C + S, hd, device=dev), torch.zeros(KV, C + S, hd, device=dev))
                      for _ in range(L)]
            for layer, (k, v) in enumerate(prefill_kv):
                caches[layer][0][:, :C] = torch.from_numpy(k).to(dev).float().transpose(0, 1)
                caches[layer][1][:, :C] = torch.from_numpy(v).to(dev).float().transpose(0, 1)

            def attend(layer, q, k, v, p):
                kc, vc = caches[layer]
                kc[:, p] = k
                vc[:, p] = v
                return F.scaled_dot_product_attention(q[None, :, None, :], kc[None, :, :p + 1], vc[None, :, :p + 1],
                                                      enable_gqa=True)[0, :, 0, :]
            return decode(attend, None)

        plan = [('full-gpu', None, None), ('kvwave-ipc', 'ipc', None), ('kvwave-host', 'host', None),
                ('kvwave-ipc-100%', 'ipc', (1.0, 0.0))]
        print(f'{"row":18s} {"loss":>8s} {"full":>8s} {"rel.incr":>9s} {"top1":>6s} {"step ms":>8s} '
              f'{"attn ms":>8s} {"append ms":>9s} {"model ms":>8s}  (per decode step, {L} layers, median)')
        for name, path, budget in plan:
            with torch.no_grad():
                logits, times = full_row() if path is None else kvwave_row(path, budget)
            loss = F.cross_entropy(logits, targets).item()
            top1 = (logits.argmax(-1) == full_top1).float().mean().item()
            tt = np.array(times[8:] if len(times) > 16 else times)
            med = np.median(tt, axis=0)
            row = {'method': name, 'device': 'cuda', 'context': C, 'steps': S, 'loss': loss, 'full_loss': full_loss,
                   'top1_agreement': top1, 'step_ms': med[0], 'attention_ms': med[1], 'append_ms': med[2],
                   'model_ms': med[0] - med[1] - med[2], 'gpu': torch.cuda.get_device_name()}
            rows.append(row)
            print(f'{name:18s} {loss:8.4f} {full_loss:8.4f} {(loss - full_loss) / full_loss:+9.4f} {top1:6.3f} '
                  f'{row["step_ms"]:8.3f} {row["attention_ms"]:8.3f} {row["append_ms"]:9.3f} {row["model_ms"]:8.3f}',
                  flush=True)
        att.close()
        client.close_client()
    finally:
        daemon.stop()
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
