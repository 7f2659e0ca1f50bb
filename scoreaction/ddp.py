"""Data parallelism for the learner without wrapping the model: gradient all-reduce hooks, and the few
collectives the epoch loop needs (mean, sum, gather, broadcast). Plain torch.distributed: every function is
the identity in one process (no process group), so the same loop runs on one rank or many.

The ``Learner`` is the same on every rank: it calls ``loss.backward()`` once per trained step of a
micro-batch and then clips and steps. DistributedDataParallel would need the UNet called through its
wrapper; instead, at the end of every backward pass that touched a parameter group, one flat (coalesced)
all-reduce averages that group's accumulated gradients over the ranks, which is what DDP does without
``no_sync``. Averaging is linear, so averaging after each of several accumulating backward passes gives
the average of the sums; gradient clipping then sees the global gradient, as in one process.
Every rank holds the same parameters and runs the same number of backward passes (equal shards).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class GradientAllReduce:
    """Average the gradients of `params` over the default process group after each backward pass."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._queued = False
        self.calls = 0
        self._handles = []
        if self.world > 1:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    def _reduce(self) -> None:
        self._queued = False
        live = [p for p in self.params if p.grad is not None]
        if not live:
            return
        flat = torch.cat([p.grad.reshape(-1).float() for p in live])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in live:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
        self.calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Make every rank hold rank 0's values of these tensors (e.g. the trainable parameters)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Average float metrics over the ranks (every rank passes the same keys)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.cpu().tolist(), strict=True))


def sum_over_ranks(values: list[float]) -> list[float]:
    """The sums of these numbers over the data-parallel learner ranks (unchanged in one process), so that
    every rank takes the same decision (skip a step, stop the run) and no rank waits in a collective that
    another one left."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_objects(obj) -> list:
    """Every rank's obj, on every rank (JSON-able objects only: this pickles between our own ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
