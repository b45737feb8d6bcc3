"""Device tensors through kvwaved for torch (issue 17): a thin layer over the kvwave module's
register_device_buffers / attend_device, which take device pointers and a cudaStream_t as ints.

    import kvwave, kvwave_torch
    c = kvwave.Client(socket_path)
    att = kvwave_torch.DeviceAttention(c, q_heads=32, head_dim=128, max_batch=1)
    for layer in range(layers):
        q = ...                                   # [B, q_heads, head_dim] float32 on the GPU
        c.append(ctx, layer, k, v)
        out, lse = att.attend([ctx], layer, q)    # on torch.cuda.current_stream()

The buffers are registered once (kvwaved maps them until close() or the end of the session);
`attend` copies q into the registered q buffer on the current stream, and returns views of the
registered out / lse buffers, valid until the next call (clone them to keep them). No host copy
and no host synchronisation: the current stream is ordered after kvwaved's GPU work.
"""

import torch


class DeviceAttention:
    def __init__(self, client, q_heads, head_dim, max_batch=1, device=None):
        self.client = client
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.q = torch.empty((max_batch, q_heads, head_dim), dtype=torch.float32, device=dev)
        self.out = torch.empty_like(self.q)
        self.lse = torch.empty((max_batch, q_heads), dtype=torch.float32, device=dev)
        self.registration = client.register_device_buffers(
            self.q.data_ptr(), self.q.numel() * 4, self.out.data_ptr(), self.out.numel() * 4,
            self.lse.data_ptr(), self.lse.numel() * 4)

    def attend(self, ctxs, layer, q, budgets=None):
        """q: [len(ctxs), q_heads, head_dim] float32 on the GPU. Returns (out, lse) views."""
        b = len(ctxs)
        if q.shape != self.q[:b].shape:
            raise ValueError(f"q must be {tuple(self.q[:b].shape)}, got {tuple(q.shape)}")
        self.q[:b].copy_(q)  # on the current stream, before "q ready" is recorded on it
        stream = torch.cuda.current_stream(self.q.device).cuda_stream
        stats = self.client.attend_device(self.registration, layer, list(ctxs), 0, 0, 0, stream,
                                          budgets or [])
        self.stats = stats
        return self.out[:b], self.lse[:b]

    def close(self):
        if self.registration is not None:
            self.client.unregister_device_buffers(self.registration)
            self.registration = None
