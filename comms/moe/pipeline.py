"""The co-scheduled MoE pipeline: dispatch -> experts -> combine over d chunks.

``run`` takes the locally ordered dispatch buffer (E experts x S rows x dim) and returns
the combined expert outputs in the same layout. The rows are split into d chunks;
the main thread computes chunk i's experts while the EP lane carries the dispatch of chunk
i+1 and the combine of chunk i-1. The backward runs the same pipeline in reverse (the
gradient of a combine is a dispatch and vice versa) and, after each chunk's expert backward
starts, hands a gradient partition to the data-parallel reducer (reducer.py), so the
gradient all-reduce fills the windows where the all-to-all link idles.

Expert math is not here: the layer passes ``fwd(x, *weights) -> (y, saved)`` and
``bwd(gy, saved, *weights) -> (gx, weight grads)`` for x of shape (local experts, rows, dim).
"""
from __future__ import annotations

import time

import torch


class _CoScheduled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, plan, *weights):
        ctx.plan, ctx.weights_meta = plan, [(w.dtype, w.shape) for w in weights]
        t0 = time.perf_counter()
        ws = [w.to(buf.dtype) for w in weights]
        outs, ctx.saved = plan.pipeline(buf, lambda x: plan.fwd(x, *ws), reducer_gaps=False)
        ctx.save_for_backward(*weights)
        plan.record("fwd", time.perf_counter() - t0)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        t0 = time.perf_counter()
        weights = ctx.saved_tensors
        ws = [w.to(grad.dtype) for w in weights]
        wgrads = []
        saved = iter(ctx.saved)

        def step(gy):
            gx, gws = plan.bwd(gy, next(saved), *ws)
            if not wgrads:
                wgrads.extend(gws)
            else:
                for acc, g in zip(wgrads, gws):
                    acc.add_(g)
            return gx

        gxs, _ = plan.pipeline(grad.contiguous(), step, reducer_gaps=True)
        ctx.saved = None
        plan.record("bwd", time.perf_counter() - t0)
        gx = gxs[0] if len(gxs) == 1 else torch.cat(gxs, dim=1)
        return (gx, None, *[g.to(dt) for g, (dt, _) in zip(wgrads, ctx.weights_meta)])


class Plan:
    """One layer call's schedule: the exchanger, d, expert functions, optional reducer."""

    def __init__(self, exchanger, ep: int, d: int, fwd, bwd, reducer=None, gap_bytes=None, record=None, counts=None):
        self.exchanger, self.ep, self.d = exchanger, ep, d
        self.fwd, self.bwd = fwd, bwd
        self.reducer, self.gap_bytes = reducer, gap_bytes
        self.record = record or (lambda phase, seconds: None)
        self.counts = counts  # (ep_src, local experts): used rows of each received block, or None
        self._layouts = None  # per chunk; the backward reuses the forward's

    def layouts(self, sizes: list[int]):
        """Per chunk, where the used rows of the received (ep_src, local, s) blocks go in a
        packed (local, width) buffer for the experts, or None when every row is used.

        Senders pad each expert's block to the fullest expert of any rank; the receiver
        knows every block's count, so it computes (and keeps activations for) only its own
        experts' rows: width = the larger of its experts' totals over all sources."""
        if self._layouts is None:
            self._layouts, start = [], 0
            for s in sizes:
                self._layouts.append(None if self.counts is None else packed_layout(self.counts, start, s))
                start += s
        return self._layouts

    def pipeline(self, buf: torch.Tensor, compute, reducer_gaps: bool):
        """Run compute over d chunks of ``buf`` (E, S, dim) between two exchanges each.

        Issue order (the performance model replays exactly this): dispatch 0, dispatch 1,
        wait 0, compute 0, combine 0, dispatch 2, wait 1, compute 1, combine 1, ...
        Returns the combined chunks and whatever ``compute`` saved per chunk.
        """
        n_exp, _, dim = buf.shape
        ep, local = self.ep, n_exp // self.ep
        chunks = torch.tensor_split(buf, self.d, dim=1)
        layouts = self.layouts([c.shape[1] for c in chunks])

        def to_experts(x, lay):  # received (ep_src, local, s, dim) -> (local, rows, dim)
            if lay is None:
                return x.permute(1, 0, 2, 3).reshape(local, -1, dim)
            pos, dest, width, _ = lay
            out = x.new_zeros(local * width, dim)
            return out.index_copy_(0, dest, x.reshape(-1, dim).index_select(0, pos)).view(local, width, dim)

        def from_experts(y, lay):  # (local, rows, dim) -> (ep_dst, local, s, dim) to send back
            if lay is None:
                return y.view(local, ep, -1, dim).permute(1, 0, 2, 3)
            pos, dest, _, s = lay
            out = y.new_zeros(ep * local * s, dim)
            return out.index_copy_(0, pos, y.reshape(-1, dim).index_select(0, dest)).view(ep, local, s, dim)

        inline = self.d == 1  # one chunk: nothing to overlap, skip the lane hand-off

        def start_dispatch(i):
            return self.exchanger.start(chunks[i], pre=lambda t: t.reshape(ep, local, -1, dim),
                                        post=lambda t: to_experts(t, layouts[i]), inline=inline)

        arrived = [start_dispatch(0)]
        combined, saved = [], []
        for i in range(self.d):
            if i + 1 < self.d:
                arrived.append(start_dispatch(i + 1))
            x = arrived[i].result()
            if reducer_gaps and self.reducer is not None:
                # The link idles while chunk i's experts compute: fill that window.
                self.reducer.fill_gap(self.gap_bytes[i] if self.gap_bytes else None)
            out = compute(x)
            if isinstance(out, tuple):
                out, keep = out
                saved.append(keep)
            combined.append(self.exchanger.start(out, pre=lambda t, lay=layouts[i]: from_experts(t, lay),
                                                 post=lambda t: t.reshape(n_exp, -1, dim), inline=inline))
        return [c.result() for c in combined], saved


def packed_layout(counts: torch.Tensor, start: int, s: int):
    """For the chunk of rows [start, start + s) of every block: (pos, dest, width, s) with
    pos the used rows' flat index in the received (ep_src, local, s) blocks and dest their
    place in the packed (local, width) buffer (expert by expert, source after source)."""
    ep, local = counts.shape
    used = (counts - start).clamp(0, s).t()  # (local, ep_src)
    mask = (torch.arange(s, device=counts.device) < used.unsqueeze(-1)).reshape(local, ep * s)
    width = int(mask.sum(1).max())
    if width == ep * s:
        return None  # no padding to skip
    expert, j = mask.nonzero(as_tuple=True)
    dest = expert * width + (mask.cumsum(1) - 1)[expert, j]
    pos = ((j // s) * local + expert) * s + j % s
    return pos, dest, width, s


def run(buf: torch.Tensor, weights, plan: Plan) -> torch.Tensor:
    """Co-scheduled dispatch -> experts -> combine of ``buf`` (E, S, dim); differentiable."""
    return _CoScheduled.apply(buf, plan, *weights)
