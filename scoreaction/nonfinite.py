"""Non-finite numbers in training: the error that stops a run, and the check of a scored batch.

A NaN or inf reward, x0_hat reward prior or rollout stops the run before any weight is updated from it
(``check_batch``); optimiser steps with a non-finite loss or gradient are skipped, and more of them in one
epoch than ``algorithm.max_skipped_steps`` stop the run (``too_many_skipped``). Either way the last training
checkpoint is intact and ``--resume`` continues from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scoreaction.config import Config
from scoreaction.scoring import Batch

AFTER = (
    "; the run stops before any weight is updated from them (the last checkpoint is intact: "
    "--resume continues from it)"
)


class NonFiniteError(RuntimeError):
    """Non-finite numbers reached the learner: a reward (or the reward prior of x0_hat) that is NaN or
    +-inf, or more non-finite optimiser steps in one epoch than ``algorithm.max_skipped_steps``. Raised
    before any weight is updated from them, so the run stops with its last checkpoint intact (``--resume``
    continues from it). The message names the reward or the steps, the epoch and how many were non-finite.

    kind: "reward", "reward_prior" or "skipped_steps"; epoch: the epoch (negative: value pre-training);
    count: non-finite samples (or skipped steps); total: samples (or steps) of that epoch seen so far."""

    def __init__(self, message: str, *, kind: str, epoch: int | None, count: int, total: int) -> None:
        super().__init__(message)
        self.kind, self.epoch, self.count, self.total = kind, epoch, count, total

    def __reduce__(self):  # picklable with its fields (Ray ships worker exceptions to the driver)
        return (_rebuild_nonfinite, (self.args[0], self.kind, self.epoch, self.count, self.total))


def _rebuild_nonfinite(message: str, kind: str, epoch: int | None, count: int, total: int) -> NonFiniteError:
    return NonFiniteError(message, kind=kind, epoch=epoch, count=count, total=total)


def reward_label(cfg: Config) -> str:
    """The optimised reward as the error messages name it: reward.name, or the weighted sum, and where it
    is computed."""
    r = cfg.reward
    label = (
        "reward.weights=" + " + ".join(f"{w:g}*{n}" for n, w in r.weights.items())
        if r.weights
        else f"reward.name={r.name!r}"
    )
    return label + (f" (scored by reward.service={r.service!r})" if r.service else "")


def epoch_label(epoch: int | None) -> str:
    if epoch is None:
        return "an unnumbered batch"
    return f"epoch {epoch}" + (" (value pre-training rollout)" if epoch < 0 else "")


def _finite_rows(x: Tensor) -> Tensor:
    """(B,) bool: whether every value of each row is finite. A row's sum is non-finite exactly when the row
    holds a NaN or an inf (finite latents and rewards are far from float32's range), and summing needs no
    copy of a (B, N + 1, C, h, w) trajectory."""
    return torch.isfinite(x.detach().float().reshape(x.shape[0], -1).sum(1))


def _examples(prompts: list[str], mask: Tensor, values: Tensor | None = None) -> str:
    """' (e.g. 'a cat' -> nan, ...)': up to three of the flagged rows, with a non-finite value of each."""
    parts = []
    for i in mask.nonzero().flatten()[:3].tolist():
        text = repr(prompts[i])
        if values is not None:
            row = values[i].detach().float().flatten()
            text += f" -> {row[~torch.isfinite(row)][0].item()}"
        parts.append(text)
    return f" (e.g. {', '.join(parts)})" if parts else ""


def check_batch(batch: Batch, cfg: Config, epoch: int) -> None:
    """Raise NonFiniteError when a reward, an x0_hat reward prior, or a trajectory (latents, KL) of the
    batch is NaN or +-inf. Every learner rank holds the whole batch, so all of them stop together."""
    rows = batch.traj.batch_size
    bad_reward = ~torch.isfinite(batch.rewards.detach().float().reshape(rows, -1)).all(1)
    bad_prior = (
        ~torch.isfinite(batch.r_x0.detach().float().reshape(rows, -1)).all(1)
        if batch.r_x0 is not None
        else torch.zeros(rows, dtype=torch.bool)
    )
    bad_traj = ~_finite_rows(batch.traj.latents)
    if "kl" in batch.traj.extras:
        bad_traj |= ~_finite_rows(batch.traj.extras["kl"])
    n_reward, n_prior, n_traj = int(bad_reward.sum()), int(bad_prior.sum()), int(bad_traj.sum())
    where = epoch_label(epoch)
    if n_reward:
        raise NonFiniteError(
            f"{reward_label(cfg)} returned a non-finite score (NaN or inf) for {n_reward} of {rows} "
            f"samples at {where}{_examples(batch.traj.prompts, bad_reward, batch.rewards.reshape(rows, -1))}"
            f"{AFTER}",
            kind="reward",
            epoch=epoch,
            count=n_reward,
            total=rows,
        )
    if n_prior:
        raise NonFiniteError(
            f"{reward_label(cfg)} returned a non-finite score (NaN or inf) of x0_hat (the value "
            f"function's reward prior, value.use_reward_prior) for {n_prior} of {rows} samples at {where}"
            f"{_examples(batch.traj.prompts, bad_prior, batch.r_x0.reshape(rows, -1))}{AFTER}",
            kind="reward_prior",
            epoch=epoch,
            count=n_prior,
            total=rows,
        )
    if n_traj:
        raise NonFiniteError(
            f"the rollout of {where} holds non-finite latents or KL (NaN or inf) in {n_traj} of {rows} "
            f"trajectories{_examples(batch.traj.prompts, bad_traj)}: an overflow of the sampler's compute dtype "
            f"(model.dtype={cfg.model.dtype!r}){AFTER}",
            kind="rollout",
            epoch=epoch,
            count=n_traj,
            total=rows,
        )


def too_many_skipped(cfg: Config, which: str, skipped: int, steps: int, epoch: int) -> NonFiniteError:
    """The error when more than algorithm.max_skipped_steps optimiser steps of an epoch were skipped."""
    return NonFiniteError(
        f"{skipped} {which} optimiser steps of {epoch_label(epoch)} had a non-finite loss or gradient "
        f"norm (NaN or inf) and were skipped (of {steps} so far), more than "
        f"algorithm.max_skipped_steps={cfg.algorithm.max_skipped_steps}; the run stops with the weights of the "
        "last good step (the last checkpoint is intact: --resume continues from it). Lower the learning rates "
        "or algorithm.max_grad_norm, or check the rewards and model.dtype",
        kind="skipped_steps",
        epoch=epoch,
        count=skipped,
        total=steps,
    )
