"""Eager 1F1B: torch's 1F1B pipeline schedule with its point-to-point traffic off the
critical path (what the Holmes cost model assumes when stages sit on different fabrics).

torch's ``Schedule1F1B`` waits for every send together with the next receive, so each
microbatch cycle of a stage costs compute + its sends: with a 25 Gb/s Ethernet link between
fabrics, a GPT-7.5B activation takes ~5.5 ms next to ~25 ms of compute per microbatch, +20%.
Here a stage

- posts each receive one microbatch ahead and waits for it only right before the compute
  that consumes it;
- fires each send right after the compute that produced it and waits for it at the end of
  the step (gloo and NCCL run it meanwhile; the stage keeps the tensor alive);
- runs 2 (p - s) - 1 forwards before its first backward (stage s of p; 1F1B: p - s), two
  more than the next stage, so a microbatch's round trip to the next stage and back (its
  compute and both sends) spans three of the stage's cycles instead of two: the sends hide
  as long as they take less than half a stage's compute. The price: stage s holds up to
  p - s - 1 more microbatches of activations (stage 0 of 4: 7 instead of 4).

The math is 1F1B's: the same microbatches, the same gradient accumulation, identical losses.
Uses the stage and schedule internals of torch 2.13's ``torch.distributed.pipelining``.
"""
from __future__ import annotations

from torch.distributed.pipelining.schedules import PipelineScheduleSingle, _batch_p2p, _wait_batch_p2p

from comms.costmodel import eager_warmup


class Eager1F1B(PipelineScheduleSingle):
    """1F1B with asynchronous sends, early receives and a deeper warm-up."""

    def _step_microbatches(self, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None,
                           return_outputs=True, loss_kwargs=None):
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        self._initialize_stage(arg_mbs[0], kwarg_mbs[0], target_mbs[0] if target_mbs is not None else None,
                               loss_kwargs)
        stage, m = self._stage, self._n_microbatches
        warmup = eager_warmup(self._num_stages, m)[stage.stage_index]
        recvs = {}  # ("F" | "B", microbatch) -> posted receive works
        sends = []  # fired sends, waited at the end

        def post(kind: str, k: int):
            if k < m:
                ops = stage.get_fwd_recv_ops(k) if kind == "F" else stage.get_bwd_recv_ops(k)
                recvs[kind, k] = _batch_p2p(ops, desc=f"{kind.lower()}wd_recv")

        def forward(k: int):
            _wait_batch_p2p(recvs.pop(("F", k)))
            post("F", k + 1)
            output = stage.forward_one_chunk(k, arg_mbs[k], kwarg_mbs[k], save_forward_output=return_outputs)
            sends.extend(_batch_p2p(stage.get_fwd_send_ops(k), desc="fwd_send"))
            self._maybe_compute_loss(stage, output, target_mbs, k, loss_kwargs)

        def backward(k: int):
            _wait_batch_p2p(recvs.pop(("B", k)))
            post("B", k + 1)
            stage.backward_one_chunk(k, loss=self._maybe_get_loss(stage, k), last_backward=k == m - 1)
            sends.extend(_batch_p2p(stage.get_bwd_send_ops(k), desc="bwd_send"))

        post("F", 0)
        post("B", 0)
        for k in range(warmup):
            forward(k)
        for k in range(m):  # steady state: one backward, one forward; then the cool-down
            backward(k)
            if warmup + k < m:
                forward(warmup + k)
        _wait_batch_p2p(sends)
        self._update_losses(stage, losses)
        stage.perform_reduce_grad(m if self.scale_grads else 1)
