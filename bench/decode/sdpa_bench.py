#!/usr/bin/env python3
"""Full attention with the KV in HBM through torch's scaled_dot_product_attention: the reference
baseline of kvwave-decode-bench (bench/decode/decode_bench.cc), one decode step of Llama-3-8B's
shape (32 query / 8 KV heads, d 128, bf16; GQA through enable_gqa) per context length and batch.
One layer is timed with CUDA events (median of 20 after 5 warm-ups, random inputs) and multiplied
by the layer count. Prints one line per (context, batch)."""
import argparse

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--contexts", default="32768,131072,524288,1048576")
p.add_argument("--batch", default="1,8")
p.add_argument("--layers", type=int, default=32)
a = p.parse_args()
dev = torch.device("cuda")
print(f"# torch {torch.__version__} on {torch.cuda.get_device_name(0)}; SDPA backends: flash "
      f"{torch.backends.cuda.flash_sdp_enabled()}, mem-efficient "
      f"{torch.backends.cuda.mem_efficient_sdp_enabled()}, cudnn "
      f"{torch.backends.cuda.cudnn_sdp_enabled()}")
for b in [int(x) for x in a.batch.split(",")]:
    for t in [int(x) for x in a.contexts.split(",")]:
        need = 2 * b * 8 * t * 128 * 2
        if need > 0.8 * torch.cuda.mem_get_info()[0]:
            print(f"{t:8d} {b:3d}  sdpa skipped: one layer's KV ({need / 2**30:.1f} GiB) does not fit")
            continue
        q = torch.randn(b, 32, 1, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, 8, t, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, 8, t, 128, device=dev, dtype=torch.bfloat16)
        times = []
        for i in range(25):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            e.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(s.elapsed_time(e))
        times.sort()
        ms = times[len(times) // 2]
        print(f"{t:8d} {b:3d}  sdpa {ms * a.layers:9.3f} ms/step ({ms:.4f} ms/layer x {a.layers}), "
              f"{need / ms / 1e6:.0f} GB/s", flush=True)
        del q, k, v, o
        torch.cuda.empty_cache()
