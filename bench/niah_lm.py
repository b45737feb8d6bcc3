#!/usr/bin/env python3
"""Needle-in-a-haystack accuracy of the fine-tuned model decoding through a real kvwaved.

Per instance of ../shared/data/niah (its generator, niah.make_set): the model of ../shared/data/lm_niah
prefills the prompt up to the question with full attention (the kit's evaluate.Runner, once per instance);
then, for every method (row), the question and the answer are decoded one token at a time, every layer's
attention being one call of the kit's swappable attend(layer, q, k_cache, v_cache). For the kvwave rows
that call pushes the prefill K/V of all layers into a running kvwaved (first call of an instance), appends
the new token's K/V and takes the output from the daemon (Attend, or Retrieve + Gather) - as an inference
server would. Exact match of the greedy answer, per family and per depth of the first answer needle.

    python3 bench/niah_lm.py --ctx 2048 --n 4 [--families passkey,multivalue] [--methods all|a,b]
                             [--drop] [--seed 1234] [--json OUT] [--threads 1] [--socket PATH]
                             [--daemon-set KEY=VALUE ...] [--kit DIR] [--model DIR] [--client module|ctypes]

--client ctypes reaches kvwaved through client/python/kvwave_ctypes.py (libkvwave_c.so, KVWAVE_C_LIB) instead
of the built module: for the GPU machine, whose Python the module does not match (the tripartite rows only).

Rows (--methods; 'all' = every one of them):
  full        the model's own exact attention (the kit's evaluate.attend), no daemon
  kvwave-100  kvwaved Attend at a 100% retrieval budget (exact through the daemon; a sanity row)
  defaults    kvwaved Attend at the daemon's default budgets (attend.retrieval_budget/estimation_budget)
  paper       kvwaved Attend at the paper's budgets, 1.8% retrieved + 23.2% estimated
  rest        kvwaved Attend, 1.8% retrieved + every other cluster estimated
  oracle-eq   exact attention over the steady zone + the best keys by true softmax mass (summed over the
              KV group), as many keys per step and layer as the defaults attended exactly (read from the
              daemon's Attend stats of that same step); the rest dropped
  quest-eq    Quest-style pages: 16 consecutive positions per page, each page scored by the upper bound
              sum_d max(q_d min_d, q_d max_d) (max over the group's heads), best pages until as many keys
              as the defaults, exact attention over them + the steady zone; the rest dropped
  topk-wave   per query head, exact attention over the top-k keys found by the daemon's Retrieve (wave
              index, default cluster budget) and fetched by Gather; k = the defaults' exactly attended keys
  tri:R:E     kvwaved Attend at retrieval budget R, estimation budget E (any number of these)
  ra:K        RetrievalAttention (issue 19): kvwaved Attend with attend.method = retrievalattention on a
              daemon with index.graph = on, the prefill queries appended with the prefill K/V (a graph per
              sealed segment is built from them): the steady zone + the graphs' top K tokens per query
              head (beam max(K, 128)), exact, merged by log-sum-exp; retrievalattention = ra:100,
              retrievalattention-1000 = ra:1000
  proto:NAME  a prototype ranking of bench/quality_rank.py (kvwave emulated in torch; see there)
  two_pass    = paper@attend.rank=two_pass; two_pass-rest = rest@attend.rank=two_pass;
  centroid    = paper@attend.rank=centroid; centroid-rest = rest@attend.rank=centroid
              (explicit budgets: the same rows whatever the daemon's defaults; the daemon's defaults are
              1.8% + the rest, attend.rank = auto since issue 18 - before, the paper's budgets)
  ROW@K=V     any kvwaved row on a second daemon started with --set K=V (several @K=V allowed): rows
              with the same settings share one daemon, the same prefill K/V pushed to each
--drop builds the same instances with the answer-bearing needles removed: a control that must score ~0.
The kvwaved rows also report their Attend time (ms per call: one layer, all heads, measured around the
client call, so it includes the socket round trip; same run, same machine, so comparable between rows) and the
keys their ranking scored in its second pass (two_pass; 'scan' = steady + retrieved + scored keys / keys).

Needs numpy and torch (Debian: python3-numpy python3-torch; run with /usr/bin/python3), the built Python
binding and kvwaved (found under build*/ as bench/e2e_lm.py does, or KVWAVE_PYTHONPATH / KVWAVED), and the
shared data: the kit ../shared/data/niah and the model ../shared/data/lm_niah (imported from there, not
copied; KVWAVE_SHARED_DATA names another data folder, e.g. from a git worktree). CPU: ~5 s per instance at 2K for the prefill (2 free cores), ~45 s at 8K; each row then costs one
decode of the question + answer (~30 steps x 8 layers).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get('KVWAVE_SHARED_DATA') or os.path.join(ROOT, '..', 'shared', 'data')
sys.path.insert(0, HERE)
import e2e_lm  # noqa: E402  (Daemon, binding lookup)

NAMED = ('full', 'kvwave-100', 'defaults', 'paper', 'rest', 'oracle-eq', 'quest-eq', 'topk-wave')
ALIASES = {'two_pass': 'paper@attend.rank=two_pass', 'two_pass-rest': 'rest@attend.rank=two_pass',
           'centroid': 'paper@attend.rank=centroid', 'centroid-rest': 'rest@attend.rank=centroid',
           'retrievalattention': 'ra:100@index.graph=on', 'retrievalattention-1000': 'ra:1000@index.graph=on'}
PAPER = (0.018, 0.232)
PAGE = 16  # Quest page size (tokens)


def load_kit(kit_dir, model_dir):
    """imports the shared NIAH kit (niah.py, evaluate.py) and the model code (qkdump.py) by path"""
    missing = [p for p in (os.path.join(kit_dir, 'niah.py'), os.path.join(kit_dir, 'evaluate.py'),
                           os.path.join(model_dir, 'qkdump.py')) if not os.path.exists(p)]
    if missing:
        raise SystemExit('niah_lm: the shared NIAH kit or model is missing (' + ', '.join(missing) + '). It lives '
                         'outside this repository, in ../shared/data/{niah,lm_niah}; set KVWAVE_SHARED_DATA to the data '
                         'folder or pass --kit / --model if it is elsewhere.')
    sys.path.insert(0, os.path.abspath(kit_dir))
    import niah  # noqa: E402
    import evaluate  # noqa: E402
    return niah, evaluate, evaluate.import_qkdump(model_dir)


def daemon_defaults(binary_path):
    """(retrieval, estimation) defaults printed by kvwaved --print-config"""
    import subprocess
    text = subprocess.run([binary_path, '--print-config'], check=True, capture_output=True, text=True).stdout
    vals, section = {}, ''
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('['):
            section = line.strip('[]')
        elif '=' in line and not line.startswith('#'):
            k, v = (x.strip() for x in line.split('=', 1))
            vals[f'{section}.{k}'] = v
    return vals


class CtypesClient:
    """The `kvwave` module's calls that the kvwaved rows make (open, append, seal, attend with its statistics,
    close), over the ctypes client (client/python/kvwave_ctypes.py, libkvwave_c.so named by KVWAVE_C_LIB): for
    a Python the built module does not match, e.g. the GPU machine's. Rows that need Retrieve, Gather or the
    prefill queries are refused."""

    def __init__(s, socket_path, shared_memory_bytes):
        sys.path.insert(0, os.path.join(ROOT, 'client', 'python'))
        import kvwave_ctypes
        s.c = kvwave_ctypes.Client(socket_path, shared_memory_bytes)

    def open(s, layers, q_heads, kv_heads, head_dim, dtype='f16'):
        return s.c.open(layers, q_heads, kv_heads, head_dim, dtype), 0

    def append(s, ctx, layer, k, v, q=None):
        if q is not None:
            raise SystemExit('niah_lm: the ctypes client does not append queries (ra rows need the kvwave module)')
        s.c.append(ctx, layer, k, v)

    def seal(s, ctx):
        s.c.seal(ctx)

    def close(s, ctx):
        s.c.close(ctx)

    def attend(s, ctx, layer, q, retrieval_budget=-1.0, estimation_budget=-1.0, **other):
        if other:
            raise SystemExit(f'niah_lm: the ctypes client takes budgets only, not {sorted(other)}')
        return s.c.attend_stats(ctx, layer, q, retrieval_budget, estimation_budget)

    def __getattr__(s, name):  # retrieve, gather, ...: not in the C ABI
        raise SystemExit(f'niah_lm: the ctypes client has no {name} (that row needs the kvwave module)')


class KvContext:
    """one kvwaved context per (method, instance): the prefill K/V of every layer pushed and sealed on the
    first decode call, then each new token's K/V appended before its attention call"""

    def __init__(s, client, runner, with_queries=False):
        s.client, s.R, s.ctx, s.have = client, runner, None, None
        s.with_queries = with_queries  # append the prefill queries too (RecordQueries must wrap the runner)

    def reset(s):
        if s.ctx is not None:
            s.client.close(s.ctx)
        s.ctx, s.have = None, None

    def rows(s, layer, a, b):
        k = s.R.k[layer, :, a:b].transpose(0, 1).float().cpu().numpy().astype(np.float16)
        v = s.R.v[layer, :, a:b].transpose(0, 1).float().cpu().numpy().astype(np.float16)
        return np.ascontiguousarray(k), np.ascontiguousarray(v)

    def sync(s, layer, n):
        """makes the daemon's context hold positions 0..n-1 of this layer (n-1 = the current token)"""
        R = s.R
        if s.ctx is None:  # first decode step of the instance: positions 0..n-2 are the prefill, all layers
            L = R.c['layers']
            s.ctx, _ = s.client.open(layers=L, q_heads=R.H, kv_heads=R.KV, head_dim=R.hd, dtype='f16')
            for l in range(L):
                if s.with_queries:  # [n - 1, H, hd] float32, recorded during the prefill
                    q = R.recorded_q[l][:, :n - 1].transpose(0, 1).float().cpu().numpy()
                    s.client.append(s.ctx, l, *s.rows(l, 0, n - 1), q=np.ascontiguousarray(q, np.float32))
                else:
                    s.client.append(s.ctx, l, *s.rows(l, 0, n - 1))
            s.client.seal(s.ctx)
            s.have = [n - 1] * L
        if s.have[layer] < n:
            s.client.append(s.ctx, layer, *s.rows(layer, s.have[layer], n))
            s.have[layer] = n


def qnp(q):
    return np.ascontiguousarray(q.float().cpu().numpy(), dtype=np.float32)


class Method:
    """decode-step attention of one row; begin() before each instance, attend() per (step, layer)"""
    needs_daemon = True

    def __init__(s, name, client, runner):
        s.name, s.client, s.R = name, client, runner
        s.kv = KvContext(client, runner) if client is not None else None
        s.exact_keys, s.keys = 0, 0  # exactly attended keys / keys seen, summed over calls (fraction reported)
        s.scanned_keys = 0  # exactly attended + scored by a second ranking pass
        s.attend_s, s.attend_calls = 0.0, 0  # time in the daemon's Attend (client call), and calls

    def begin(s):
        if s.kv is not None:
            s.kv.reset()

    def end(s):
        if s.kv is not None:
            s.kv.reset()

    def count(s, exact, n, scored=0):
        s.exact_keys += exact
        s.scanned_keys += exact + scored
        s.keys += n


class Full(Method):
    needs_daemon = False

    def __init__(s, name, client, runner, exact_fn):
        super().__init__(name, None, runner)
        s.fn = exact_fn

    def attend(s, layer, q, k, v):
        s.count(k.shape[1], k.shape[1])
        return s.fn(layer, q, k, v)


class Tripartite(Method):
    def __init__(s, name, client, runner, retrieval, estimation):
        super().__init__(name, client, runner)
        s.r, s.e = retrieval, estimation

    def attend(s, layer, q, k, v):
        n = k.shape[1]
        s.kv.sync(layer, n)
        qn = qnp(q)
        t = time.perf_counter()
        out, _, st = s.client.attend(s.kv.ctx, layer, qn, retrieval_budget=s.r, estimation_budget=s.e)
        s.attend_s += time.perf_counter() - t
        s.attend_calls += 1
        s.count((st['steady_tokens'] + st['retrieved_tokens']) / s.R.KV, n, st.get('scored_tokens', 0) / s.R.KV)
        return __import__('torch').from_numpy(np.asarray(out, np.float32)).to(q.device)


def record_queries(runner):
    """Wraps runner.qkv so that every query it computes (prefill and decode) is kept per layer in
    runner.recorded_q[layer] (H, tmax, hd), for the rows that append prefill queries."""
    import torch
    if hasattr(runner, 'recorded_q'):
        return
    tmax = runner.k.shape[2]
    runner.recorded_q = [torch.zeros(runner.H, tmax, runner.hd, dtype=torch.float16)
                         for _ in range(runner.c['layers'])]
    layer_of = {id(b): l for l, b in enumerate(runner.m.blocks)}
    inner = runner.qkv

    def qkv(blk, x, a, b):
        q, k, v = inner(blk, x, a, b)
        assert q.shape[0] == 1 and q.shape[1] == runner.H and q.shape[2] == b - a, q.shape
        runner.recorded_q[layer_of[id(blk)]][:, a:b] = q[0].detach().to('cpu', torch.float16)
        return q, k, v
    runner.qkv = qkv


class RetrievalAttention(Method):
    def __init__(s, name, client, runner, top_k):
        super().__init__(name, client, runner)
        s.kv = KvContext(client, runner, with_queries=True)
        s.top_k, s.beam = top_k, max(top_k, 128)
        record_queries(runner)

    def attend(s, layer, q, k, v):
        n = k.shape[1]
        s.kv.sync(layer, n)
        qn = qnp(q)
        t = time.perf_counter()
        out, _, st = s.client.attend(s.kv.ctx, layer, qn, method='retrievalattention', graph_top_k=s.top_k,
                                     beam=s.beam)
        s.attend_s += time.perf_counter() - t
        s.attend_calls += 1
        # per query head: steady tokens are summed over KV heads, retrieved and scored over query heads
        exact = st['steady_tokens'] / s.R.KV + st['retrieved_tokens'] / s.R.H
        s.count(exact, n, max(0.0, st['graph_keys_scored'] / s.R.H - st['retrieved_tokens'] / s.R.H))
        return __import__('torch').from_numpy(np.asarray(out, np.float32)).to(q.device)


class EqualKeys(Method):
    """rows that attend exactly as many keys as the defaults do at the same step: asks the daemon's Attend at
    its defaults (output discarded) for the steady and retrieved token counts"""

    def budget(s, layer, q, n):
        s.kv.sync(layer, n)
        _, _, st = s.client.attend(s.kv.ctx, layer, qnp(q))
        return st['steady_tokens'] // s.R.KV, st['retrieved_tokens'] // s.R.KV

    @staticmethod
    def exact_over(q, K, V, keep):
        """exact attention of the group's heads q (g, d) over the keys where keep (n,) is true"""
        sc = (q @ K.T) / math.sqrt(q.shape[1])
        return sc.masked_fill(~keep, float('-inf')).softmax(-1) @ V

    def steady_mask(s, n, steady):
        import torch
        keep = torch.zeros(n, dtype=torch.bool)
        sink = min(4, n)
        keep[:sink] = True
        keep[max(0, n - (steady - sink)):] = True
        return keep


class Oracle(EqualKeys):
    def attend(s, layer, q, k, v):
        import torch
        n = k.shape[1]
        steady, retrieved = s.budget(layer, q, n)
        KV, g = s.R.KV, s.R.H // s.R.KV
        out = torch.empty(s.R.H, s.R.hd)
        for kh in range(KV):
            qq, K, V = q[kh * g:(kh + 1) * g].float().cpu(), k[kh].float().cpu(), v[kh].float().cpu()
            keep = s.steady_mask(n, steady)
            mass = ((qq @ K.T) / math.sqrt(s.R.hd)).softmax(-1).sum(0)
            mass[keep] = -1
            take = min(retrieved, int((~keep).sum()))
            if take > 0:
                keep[mass.topk(take).indices] = True
            s.count(int(keep.sum()), n)
            out[kh * g:(kh + 1) * g] = s.exact_over(qq, K, V, keep)
        return out.to(q.device)


class Quest(EqualKeys):
    def attend(s, layer, q, k, v):
        import torch
        n = k.shape[1]
        steady, retrieved = s.budget(layer, q, n)
        KV, g = s.R.KV, s.R.H // s.R.KV
        out = torch.empty(s.R.H, s.R.hd)
        for kh in range(KV):
            qq, K, V = q[kh * g:(kh + 1) * g].float().cpu(), k[kh].float().cpu(), v[kh].float().cpu()
            keep = s.steady_mask(n, steady)
            cand = torch.nonzero(~keep).flatten()  # pages over the positions outside the steady zone
            if len(cand) and retrieved > 0:
                lo, hi = int(cand[0]), int(cand[-1]) + 1
                pages = (hi - lo + PAGE - 1) // PAGE
                pad = pages * PAGE - (hi - lo)
                Kc = K[lo:hi]
                if pad:
                    Kc = torch.cat([Kc, Kc[-1:].expand(pad, -1)])
                Kp = Kc.view(pages, PAGE, -1)
                mn, mx = Kp.min(1).values, Kp.max(1).values  # (pages, d)
                bound = torch.maximum(qq[:, None] * mn[None], qq[:, None] * mx[None]).sum(-1).max(0).values
                order = bound.argsort(descending=True)
                take = min(pages, (retrieved + PAGE - 1) // PAGE)
                for p in order[:take].tolist():
                    keep[lo + p * PAGE:min(hi, lo + (p + 1) * PAGE)] = True
            s.count(int(keep.sum()), n)
            out[kh * g:(kh + 1) * g] = s.exact_over(qq, K, V, keep)
        return out.to(q.device)


class TopkWave(EqualKeys):
    def attend(s, layer, q, k, v):
        import torch
        n = k.shape[1]
        steady, retrieved = s.budget(layer, q, n)
        kk = max(1, steady + retrieved)
        pos, _, _, _ = s.client.retrieve(s.kv.ctx, layer, qnp(q), k=kk, method='wave')
        KV, g, hd = s.R.KV, s.R.H // s.R.KV, s.R.hd
        union = np.unique(pos[pos >= 0])
        K, V = s.client.gather(s.kv.ctx, layer, np.ascontiguousarray(union, np.int64))
        K, V = torch.from_numpy(K.astype(np.float32)), torch.from_numpy(V.astype(np.float32))
        row = {int(p): i for i, p in enumerate(union)}
        out = torch.empty(s.R.H, hd)
        qq = q.float().cpu()
        for h in range(s.R.H):
            rows = torch.tensor([row[int(p)] for p in pos[h] if p >= 0], dtype=torch.long)
            Kh, Vh = K[rows, h // g], V[rows, h // g]
            out[h] = ((qq[h] @ Kh.T) / math.sqrt(hd)).softmax(-1) @ Vh
        s.count(float((pos >= 0).sum()) / s.R.H, n)  # keys per query head
        return out.to(q.device)


def make_methods(names, clients, runner, exact_fn):
    """clients: settings suffix ('' or '@K=V...') -> a client of the daemon started with those settings"""
    out = []
    for full_name in names:
        name, at, extra = ALIASES.get(full_name, full_name).partition('@')
        client = clients.get(at + extra)
        before = len(out)
        if name == 'full':
            out.append(Full(name, client, runner, exact_fn))
        elif name == 'kvwave-100':
            out.append(Tripartite(name, client, runner, 1.0, 0.0))
        elif name == 'defaults':
            out.append(Tripartite(name, client, runner, -1.0, -1.0))
        elif name == 'paper':
            out.append(Tripartite(name, client, runner, *PAPER))
        elif name == 'rest':
            out.append(Tripartite(name, client, runner, PAPER[0], 1.0 - PAPER[0]))
        elif name == 'oracle-eq':
            out.append(Oracle(name, client, runner))
        elif name == 'quest-eq':
            out.append(Quest(name, client, runner))
        elif name == 'topk-wave':
            out.append(TopkWave(name, client, runner))
        elif name.startswith('proto:'):  # a prototype ranking of bench/quality_rank.py (torch, no daemon)
            import quality_rank
            m = quality_rank.make(name[len('proto:'):])
            m.name = name
            out.append(m)
        elif name.startswith('ra:'):
            if client is None or 'index.graph=on' not in extra:
                raise SystemExit(f'niah_lm: {full_name}: ra rows need a daemon with @index.graph=on')
            out.append(RetrievalAttention(name, client, runner, int(name[3:])))
        elif name.startswith('tri:'):
            _, r, e = name.split(':')
            out.append(Tripartite(name, client, runner, float(r), float(e)))
        else:
            raise SystemExit(f'niah_lm: unknown method {name!r} (known: {", ".join(NAMED)}, tri:R:E)')
        out[before].name = full_name
    return out


def daemon_suffixes(names):
    """the distinct settings suffixes ('' = the plain daemon) of the rows that need a daemon"""
    out = []
    for full_name in names:
        name, at, extra = ALIASES.get(full_name, full_name).partition('@')
        if name == 'full' or name.startswith('proto:'):
            continue
        if at + extra not in out:
            out.append(at + extra)
    return out


def decode(R, ids, alen, split):
    """the kit's Runner.greedy after its prefill: teacher-forced question, then greedy answer tokens"""
    P = len(ids) - alen
    for p in range(split, P):
        lg = R.step(int(ids[p]), p)
    outp = []
    for i in range(alen):
        outp.append(int(lg.argmax()))
        if i < alen - 1:
            lg = R.step(outp[-1], P + i)
    return outp


def summarise(niah, rows, method):
    res = {}
    for fam in niah.FAMILIES:
        r = [x for x in rows if x['family'] == fam and x['method'] == method]
        if not r:
            continue
        d = np.asarray([x['depth'] for x in r], dtype=float)
        ok = np.asarray([x['ok'] for x in r])
        bins = []
        for lo in np.arange(0, 1, 0.2):
            sel = (d >= lo) & (d < lo + 0.2 + 1e-9)
            bins.append([int(ok[sel].sum()), int(sel.sum())])
        res[fam] = {'n': len(r), 'ok': int(ok.sum()), 'exact': float(ok.mean()),
                    'first_token': float(np.mean([x['first'] for x in r])),
                    'tokens': float(np.mean([x['tokens_ok'] for x in r])), 'by_depth': bins}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ctx', type=int, default=2048)
    ap.add_argument('--n', type=int, default=4, help='instances per family')
    ap.add_argument('--seed', type=int, default=1234)
    ap.add_argument('--first', type=int, default=0, help='skip the first instances of each family')
    ap.add_argument('--only', default='', help='comma list of instance numbers (within --first/--n) to run')
    ap.add_argument('--families', default='passkey,multivalue')
    ap.add_argument('--methods', default='full,defaults')
    ap.add_argument('--drop', action='store_true', help='control: the answer-bearing needles removed')
    ap.add_argument('--kit', default=os.path.join(SHARED, 'niah'))
    ap.add_argument('--model', default=os.path.join(SHARED, 'lm_niah'))
    ap.add_argument('--tokens', default='', help='haystack token file (default: MODEL/eval.u16)')
    ap.add_argument('--socket', default='', help='a running kvwaved (default: start one)')
    ap.add_argument('--daemon-set', action='append', default=[], help='KEY=VALUE for the started kvwaved')
    ap.add_argument('--threads', type=int, default=1, help='torch CPU threads (the dev VM is shared)')
    ap.add_argument('--json', default='')
    ap.add_argument('--client', choices=('module', 'ctypes'), default='module',
                    help='ctypes: the ctypes client (a Python the built kvwave module does not match: the GPU machine)')
    args = ap.parse_args()

    niah, evaluate, qk = load_kit(args.kit, args.model)
    import torch
    if qk.DEV == 'cpu':
        torch.set_num_threads(args.threads)
    names = list(NAMED) if args.methods == 'all' else [m for m in args.methods.split(',') if m]
    families = tuple(args.families.split(','))
    tokens = niah.load_tokens(args.tokens or os.path.join(args.model, 'eval.u16'))
    S = niah.make_set(tokens, args.ctx, args.first + args.n, args.seed, families, args.drop)
    keep_idx = [i for i in range(len(S['ids'])) if i % (args.first + args.n) >= args.first]
    if args.only:  # instance numbers within each family
        only = {int(x) for x in args.only.split(',')}
        keep_idx = [i for i in keep_idx if i % (args.first + args.n) in only]
    model, cfg = qk.load(args.model)
    model = model.to(qk.DEV).eval()
    R = evaluate.Runner(qk, model, args.ctx)

    suffixes = daemon_suffixes(names)
    daemons, clients, settings = [], {}, {}
    if suffixes:
        make_client = (CtypesClient if args.client == 'ctypes'
                       else lambda path, size: e2e_lm.import_binding().Client(socket_path=path, shared_memory_bytes=size))
        if not args.socket:
            binary = os.environ.get('KVWAVED') or e2e_lm.find_one(['build*/**/rpc/kvwaved'], 'kvwaved')
            settings = daemon_defaults(binary)
            for kvs in args.daemon_set:
                k, v = kvs.split('=', 1)
                settings[k] = v
        for suffix in suffixes:
            extra = [x for x in suffix.split('@') if x]
            if extra and args.socket:
                raise SystemExit('niah_lm: rows with @settings start their own daemon (no --socket)')
            d = e2e_lm.Daemon(args.socket, list(args.daemon_set) + extra)
            daemons.append(d)
            clients[suffix] = make_client(d.socket, 256 << 20)  # Daemon waited for ready
    defaults = {k: settings.get(k) for k in ('attend.retrieval_budget', 'attend.estimation_budget', 'attend.rank',
                                             'attend.rank_overfetch', 'store.sink_tokens', 'store.recent_tokens',
                                             'index.tokens_per_cluster', 'gpu.mode')}
    methods = make_methods(names, clients, R, evaluate.attend)
    print(f'# niah_lm: ctx {args.ctx}, {args.n} instances x {",".join(families)} (seed {args.seed}, first {args.first})'
          f'{" DROP (needles removed)" if args.drop else ""}; model {os.path.abspath(args.model)}; device {qk.DEV}, '
          f'torch threads {torch.get_num_threads()}; daemon settings {defaults}', flush=True)
    rows, t0 = [], time.time()
    try:
        for i in keep_idx:
            ids = torch.from_numpy(S['ids'][i].astype(np.int64)).to(qk.DEV)
            al, split = int(S['ans_len'][i]), int(S['q_start'][i])
            gold = S['ids'][i][-al:].tolist()
            fam = niah.FAMILIES[S['family'][i]]
            t = time.time()
            R.prefill(ids[:split])
            tp = time.time() - t
            line = []
            for m in methods:
                t = time.time()
                m.begin()
                for a, v in (('scanned_keys', None), ('attend_s', 0.0), ('attend_calls', 0)):
                    if not hasattr(m, a):  # a prototype (quality_rank.Proto): no daemon, no second pass counted
                        setattr(m, a, v)
                e0, n0, a0, c0 = m.exact_keys, m.keys, m.attend_s, m.attend_calls
                sc0 = m.scanned_keys if m.scanned_keys is not None else e0
                R.attend = m.attend
                pred = decode(R, ids, al, split)
                m.end()
                frac = (m.exact_keys - e0) / max(1, m.keys - n0)
                scan = ((m.scanned_keys if m.scanned_keys is not None else m.exact_keys) - sc0) / max(1, m.keys - n0)
                attend_ms = 1e3 * (m.attend_s - a0) / max(1, m.attend_calls - c0) if m.attend_calls > c0 else None
                rows.append({'scanned_key_fraction': scan, 'attend_ms': attend_ms, 'method': m.name, 'family': fam, 'instance': i % (args.first + args.n), 'ok': pred == gold,
                             'first': pred[0] == gold[0], 'tokens_ok': float(np.mean([a == b for a, b in zip(pred, gold)])),
                             'depth': float(S['depth'][i]), 'exact_key_fraction': frac, 'pred': pred, 'gold': gold,
                             's': time.time() - t})
                line.append(f'{m.name} {"ok" if pred == gold else "--"} ({frac * 100:.1f}% keys, {time.time() - t:.1f}s)')
            print(f'  {fam} #{i % (args.first + args.n)} depth {S["depth"][i]:.2f} prefill {tp:.1f}s: ' + '; '.join(line), flush=True)
    finally:
        clients.clear()
        for d in daemons:
            d.stop()
    res = {'ctx': args.ctx, 'n_per_family': args.n, 'first': args.first, 'seed': args.seed, 'families': list(families),
           'drop': args.drop, 'model': os.path.abspath(args.model), 'daemon_settings': defaults,
           'torch_threads': torch.get_num_threads(), 'seconds': time.time() - t0, 'methods': {}, 'rows': rows}
    print(f'{"method":14s} {"family":11s} {"exact":>9s} {"first":>6s} {"tokens":>6s} {"keys":>6s} {"scan":>6s} '
          f'{"attend":>9s}   exact by depth (5 bins: ok/n)')
    for m in methods:
        fams = summarise(niah, rows, m.name)
        mine = [x for x in rows if x['method'] == m.name]
        mk = [x['exact_key_fraction'] for x in mine]
        ms = [x['scanned_key_fraction'] for x in mine]
        am = 1e3 * m.attend_s / m.attend_calls if m.attend_calls else None
        res['methods'][m.name] = {'families': fams, 'exact_key_fraction': float(np.mean(mk)) if mk else None,
                                  'scanned_key_fraction': float(np.mean(ms)) if ms else None, 'attend_ms': am,
                                  'attend_calls': m.attend_calls}
        for f, e in fams.items():
            print(f'{m.name:14s} {f:11s} {e["ok"]:3d}/{e["n"]:<3d}   {e["first_token"]:6.3f} {e["tokens"]:6.3f} '
                  f'{res["methods"][m.name]["exact_key_fraction"] * 100:5.1f}% '
                  f'{res["methods"][m.name]["scanned_key_fraction"] * 100:5.1f}% '
                  f'{"%7.2fms" % am if am is not None else "       -":>9s}   '
                  + ' '.join(f'{a}/{b}' if b else '-' for a, b in e['by_depth']), flush=True)
    print(f'# {len(keep_idx)} instances x {len(methods)} rows in {res["seconds"]:.0f}s', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
