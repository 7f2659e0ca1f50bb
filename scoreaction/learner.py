"""The learner step: value update, then policy update (CTRL ratio / CTRL value-gradient / DDPO).

One process, no Ray: the Ray Train learner wraps ``Learner.update``. Works on any policy with the
DiffusionPolicy interface (SD presets and toy-gmm alike).

Precision: trainable weights stay fp32; log-probs, KL and advantages are fp32 whatever the compute dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from scoreaction.algorithms import (
    PerPromptStatTracker,
    clipped_surrogate,
    lambda_advantages,
    normalize_per_step,
    reward_to_go,
)
from scoreaction.config import Config
from scoreaction.rewards import RewardFn
from scoreaction.sampling import Policy, Trajectory, transition
from scoreaction.sde import alpha_bar, eps_to_score, step_kl
from scoreaction.value import ValueFunction, explained_variance

logger = logging.getLogger(__name__)


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


@dataclass
class Batch:
    """One epoch's scored trajectories. rewards: (B,); r_x0: (B, N) reward of x0_hat_k, or None."""

    traj: Trajectory
    rewards: Tensor
    r_x0: Tensor | None = None


def x0_hat(policy: Policy, traj: Trajectory) -> Tensor:
    """Tweedie / DDIM estimates x0_hat_k = (x_k - sqrt(1 - ab_k) eps_k) / sqrt(ab_k), (B, N, ...), from the
    rollout's epsilons (``extras['eps']``)."""
    eps = traj.extras["eps"]
    ab = alpha_bar(policy.schedule, traj.timesteps[:-1]).float().to(eps.device)
    shape = (1, -1) + (1,) * (eps.dim() - 2)
    return (traj.latents[:, :-1] - (1 - ab).sqrt().view(shape) * eps) / ab.sqrt().view(shape)


@torch.no_grad()
def reward_of_x0_hat(policy: Policy, traj: Trajectory, reward_fn: RewardFn, chunk: int = 64) -> Tensor:
    """R(decode(x0_hat_k)) for every state k < N: (B, N). Frozen (no grad)."""
    x0 = x0_hat(policy, traj)
    b, n = x0.shape[:2]
    flat = x0.reshape(b * n, *x0.shape[2:])
    prompts = [p for p in traj.prompts for _ in range(n)]
    out = []
    for i in range(0, b * n, chunk):
        decoded = policy.decode(flat[i : i + chunk])
        if decoded.dim() == 4:
            decoded = decoded.clamp(0, 1)
        out.append(reward_fn(decoded, prompts[i : i + chunk]).float().cpu())
    return torch.cat(out).view(b, n)


def lr_factor(schedule: str, epoch: int, epochs: int, final_ratio: float) -> float:
    """Multiplier of the policy learning rate at `epoch` (0-based) of `epochs`: 1 at epoch 0, final_ratio at
    the last epoch for the decayed schedules."""
    if schedule == "constant" or epochs <= 1:
        return 1.0
    progress = min(1.0, epoch / (epochs - 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return final_ratio + (1 - final_ratio) * shape


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(values: list[float]) -> list[float]:
    """The sums of these numbers over the data-parallel learner ranks (unchanged in one process), so that
    every rank takes the same decision (skip a step, stop the run) and no rank waits in a collective that
    another one left."""
    if _world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


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


class Learner:
    """Holds the optimisers and the DDPO stat tracker; ``update`` runs one epoch's learning."""

    def __init__(self, policy: Policy, value_fn: ValueFunction, cfg: Config) -> None:
        self.policy, self.value_fn, self.cfg = policy, value_fn, cfg
        alg = cfg.algorithm
        self.optimizer = torch.optim.AdamW(
            policy.trainable_parameters(), lr=alg.learning_rate, weight_decay=alg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda epoch: lr_factor(alg.lr_schedule, epoch, cfg.run.epochs, alg.lr_final_ratio),
        )
        self.value_optimizer = torch.optim.Adam(value_fn.parameters(), lr=cfg.value.learning_rate)
        self.tracker = PerPromptStatTracker(alg.stat_buffer, alg.stat_min_count)
        self.generator = torch.Generator().manual_seed(cfg.run.seed + 1)

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the policy weights: both optimisers, F_phi, the DDPO
        stat tracker and the learner's RNG (timestep subsets, shuffles)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(),
            "value_fn": self.value_fn.state_dict(),
            "tracker": self.tracker.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints written before lr schedules existed ran at a constant rate
            self.scheduler.load_state_dict(state["scheduler"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.value_fn.load_state_dict(state["value_fn"])
        self.tracker.load_state_dict(state["tracker"])
        self.generator.set_state(state["generator"])

    # ----------------------------------------------------------------------------------------------
    # Non-finite numbers
    # ----------------------------------------------------------------------------------------------

    def _epoch(self, epoch: int | None) -> int:
        """The epoch being learned: the caller's, else the policy updates so far (= the epoch in both loops,
        restored with the scheduler on resume)."""
        return int(self.scheduler.last_epoch) if epoch is None else epoch

    def check_batch(self, batch: Batch, epoch: int | None = None, *, over_ranks: bool = True) -> None:
        """Raise NonFiniteError when a reward, an x0_hat reward prior, or a trajectory (latents, KL) of the
        batch is NaN or +-inf, before anything is learned from it. Every update entry point calls it, so
        both training loops (and any caller) are covered. over_ranks: the batch is this rank's shard, and
        the counts are summed over the data-parallel ranks so that all of them stop together."""
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
        counts = [float(rows), float(bad_reward.sum()), float(bad_prior.sum()), float(bad_traj.sum())]
        if over_ranks:
            counts = sum_over_ranks(counts)
        total, n_reward, n_prior, n_traj = (int(c) for c in counts)
        if not (n_reward or n_prior or n_traj):
            return
        epoch = self._epoch(epoch)
        where = epoch_label(epoch)
        after = (
            "; the run stops before any weight is updated from them (the last checkpoint is intact: "
            "--resume continues from it)"
        )

        if n_reward:
            raise NonFiniteError(
                f"{reward_label(self.cfg)} returned a non-finite score (NaN or inf) for {n_reward} of {total} "
                f"samples at {where}{_examples(batch.traj.prompts, bad_reward, batch.rewards.reshape(rows, -1))}"
                f"{after}",
                kind="reward",
                epoch=epoch,
                count=n_reward,
                total=total,
            )
        if n_prior:
            raise NonFiniteError(
                f"{reward_label(self.cfg)} returned a non-finite score (NaN or inf) of x0_hat (the value "
                f"function's reward prior, value.use_reward_prior) for {n_prior} of {total} samples at {where}"
                f"{_examples(batch.traj.prompts, bad_prior, batch.r_x0.reshape(rows, -1))}{after}",
                kind="reward_prior",
                epoch=epoch,
                count=n_prior,
                total=total,
            )
        raise NonFiniteError(
            f"the rollout of {where} holds non-finite latents or KL (NaN or inf) in {n_traj} of {total} "
            f"trajectories{_examples(batch.traj.prompts, bad_traj)}: an overflow of the sampler's compute dtype "
            f"(model.dtype={self.cfg.model.dtype!r}){after}",
            kind="rollout",
            epoch=epoch,
            count=n_traj,
            total=total,
        )

    def _too_many_skipped(self, which: str, skipped: int, steps: int, epoch: int | None) -> NonFiniteError:
        limit = self.cfg.algorithm.max_skipped_steps
        epoch = self._epoch(epoch)
        return NonFiniteError(
            f"{skipped} {which} optimiser steps of {epoch_label(epoch)} had a non-finite loss or gradient "
            f"norm (NaN or inf) and were skipped (of {steps} so far), more than "
            f"algorithm.max_skipped_steps={limit}; the run stops with the weights of the last good step "
            "(the last checkpoint is intact: --resume continues from it). Lower the learning rates or "
            "algorithm.max_grad_norm, or check the rewards and model.dtype",
            kind="skipped_steps",
            epoch=epoch,
            count=skipped,
            total=steps,
        )

    # ----------------------------------------------------------------------------------------------
    # Value function
    # ----------------------------------------------------------------------------------------------

    def values(self, batch: Batch, grad: bool = False) -> Tensor:
        """V at every state: (B, N + 1), with the exact reward at the final state."""
        traj = batch.traj
        b, n = traj.batch_size, traj.num_steps
        dev = next(self.value_fn.parameters()).device
        t = traj.timesteps[:-1].float().to(dev).repeat(b)  # (B * N,) row-major over (b, k)
        x = traj.latents[:, :-1].reshape(b * n, *traj.latents.shape[2:]).to(dev)
        emb = traj.prompt_embeds.to(dev).repeat_interleave(n, dim=0)
        r_x0 = batch.r_x0.reshape(-1).to(dev) if batch.r_x0 is not None else None
        with torch.set_grad_enabled(grad):
            v = self.value_fn(t, x, emb, r_x0).view(b, n)
        return torch.cat([v, batch.rewards.float().to(dev)[:, None]], dim=1)

    def update_value(self, batch: Batch, epoch: int | None = None) -> dict[str, float]:
        """Regress V(t_k, x_k) to the reward-to-go r - kl_coef * sum_{j>=k} KL_j (k < N).

        epoch: the epoch the batch belongs to (named by errors; default: the policy updates so far). A step
        whose loss or gradient is not finite is skipped (value/skipped_steps)."""
        self.check_batch(batch, epoch)
        vcfg, kl_coef = self.cfg.value, self.cfg.algorithm.kl_coef
        params = [p for p in self.value_fn.parameters() if p.requires_grad]
        skipped = steps = 0
        target = reward_to_go(batch.rewards.float(), batch.traj.extras["kl"].float(), kl_coef)[:, :-1]
        b = batch.traj.batch_size
        losses = []
        mb = max(1, min(b, self.cfg.algorithm.micro_batch_size * 8))
        for _ in range(vcfg.updates_per_epoch):
            for idx in torch.randperm(b, generator=self.generator).split(mb):
                sub = Batch(
                    batch.traj.index(idx),
                    batch.rewards[idx],
                    batch.r_x0[idx] if batch.r_x0 is not None else None,
                )
                pred = self.values(sub, grad=True)[:, :-1]
                loss = torch.nn.functional.mse_loss(pred, target[idx].to(pred.device))
                self.value_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                steps += 1
                grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
                (bad,) = sum_over_ranks([float(not (math.isfinite(loss.item()) and grads_finite))])
                if bad:
                    self.value_optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    logger.warning(
                        "value step %d of %s skipped: non-finite loss or gradient", steps, epoch_label(epoch)
                    )
                    if skipped > self.cfg.algorithm.max_skipped_steps:
                        raise self._too_many_skipped("value-function", skipped, steps, epoch)
                    continue
                self.value_optimizer.step()
                losses.append(loss.item())
        pred = self.values(batch)[:, :-1].cpu()
        return {
            "value/loss": float(np.mean(losses)) if losses else float("nan"),
            "value/explained_variance": explained_variance(pred.flatten(), target.flatten()),
            "value/skipped_steps": float(skipped),
        }

    # ----------------------------------------------------------------------------------------------
    # Policy
    # ----------------------------------------------------------------------------------------------

    def _steps(self, n: int) -> list[int]:
        k = max(1, round(self.cfg.algorithm.timestep_fraction * n))
        if k == n:
            return list(range(n))
        return sorted(torch.randperm(n, generator=self.generator)[:k].tolist())

    def advantages(self, batch: Batch, epoch: int | None = None) -> tuple[Tensor, Tensor]:
        """Normalised, clipped advantages (B, N) and the per-step normalisation std (N,) of the ratio
        estimator: lambda-weighted TD advantages for ctrl (normalised per step index over the batch), the tracker's
        for ddpo (which updates the tracker). A data-parallel learner computes them once over the whole
        batch and hands each rank its rows (``update_policy(shard, advantages=...)``), so that several
        learner workers take the same step as one. Raises NonFiniteError on a non-finite reward first
        (every rank holds the whole batch here, so all of them stop)."""
        self.check_batch(batch, epoch, over_ranks=False)
        alg = self.cfg.algorithm
        kl = batch.traj.extras["kl"].float()
        if alg.name == "ddpo":
            shaped = batch.rewards.float() - alg.kl_coef * kl.sum(1)
            adv = torch.as_tensor(
                self.tracker.update(batch.traj.prompts, shaped.numpy()), dtype=torch.float32
            )
            adv = adv.clamp(-alg.adv_clip, alg.adv_clip)[:, None].expand(-1, batch.traj.num_steps)
            return adv, torch.ones(batch.traj.num_steps)
        values = self.values(batch).cpu()
        return normalize_per_step(lambda_advantages(values, kl, alg.kl_coef, alg.gae_lambda), alg.adv_clip)

    def update_policy(
        self, batch: Batch, advantages: tuple[Tensor, Tensor] | None = None, epoch: int | None = None
    ) -> dict[str, float]:
        """One epoch's policy update; then the learning-rate schedule advances by one epoch.

        advantages: (adv rows of this batch, per-step std) from ``advantages`` on a larger batch that this
        one is a shard of; computed here from this batch when None. Unused by the value-gradient estimator.
        epoch: named by errors (default: the policy updates so far). A non-finite reward stops the run
        (NonFiniteError) before any step; a step whose loss or gradient norm is not finite is skipped and
        counted (learner/skipped_steps); more than algorithm.max_skipped_steps of them stop the run."""
        self.check_batch(batch, epoch)
        epoch = self._epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        alg = self.cfg.algorithm
        if alg.name == "ctrl" and alg.estimator == "value_gradient":
            metrics = self._update_value_gradient(batch, epoch)
        else:
            metrics = self._update_ratio(batch, advantages or self.advantages(batch, epoch), epoch)
        self.scheduler.step()
        return {**metrics, "learner/lr": lr}

    def _update_ratio(
        self, batch: Batch, advantages: tuple[Tensor, Tensor], epoch: int | None = None
    ) -> dict[str, float]:
        alg = self.cfg.algorithm
        traj = batch.traj
        adv, adv_std = advantages
        if adv.shape[0] != traj.batch_size:
            raise ValueError(
                f"advantages have {adv.shape[0]} rows for a batch of {traj.batch_size} trajectories"
            )
        d = traj.latents[0, 0].numel()
        use_kl = alg.name == "ctrl" and alg.kl_coef > 0
        stats: dict[str, list[float]] = {
            "loss": [],
            "clipfrac": [],
            "approx_kl": [],
            "kl_penalty": [],
            "grad_norm": [],
        }

        def step_loss(sub: Trajectory, idx: Tensor, k: int, num_trained: int) -> Tensor:
            out = transition(self.policy, sub, k)
            log_ratio = (out.log_prob - sub.log_probs[:, k].to(out.log_prob.device)) / d
            pg, clipfrac, approx_kl = clipped_surrogate(
                adv[idx, k].to(log_ratio.device), log_ratio, alg.clip_range
            )
            loss = pg / num_trained
            if use_kl:
                kl_theta = step_kl(out.mean, sub.extras["mean_ref"][:, k].to(out.mean.device), out.std)
                # Same reductions as the surrogate, so kl_coef keeps its meaning: the surrogate is
                # divided by std_k (advantage normalisation), by D (dim-averaged log-probs) and by
                # the number of steps (mean over k); the exact gradient of E[r] - kl_coef KL is
                # sum_k [E[A_k grad log p] - kl_coef grad KL_k], so the penalty takes the same scale.
                penalty = alg.kl_coef * (kl_theta / (float(adv_std[k]) * d)).mean() / num_trained
                loss = loss + penalty
                stats["kl_penalty"].append(penalty.item())
            stats["clipfrac"].append(float(clipfrac))
            stats["approx_kl"].append(float(approx_kl))
            return loss

        return self._optimise(traj, step_loss, stats, epoch)

    def micro_batches_per_step(self) -> int:
        """Micro-batches whose gradients one optimizer step accumulates: algorithm.trajectories_per_step over
        the micro-batch of all ranks (this learner's micro_batch_size times the data-parallel world size: a
        data-parallel learner gets micro_batch_size / world of every micro-batch); 1 when it is None."""
        alg = self.cfg.algorithm
        if alg.trajectories_per_step is None:
            return 1
        per_backward = alg.micro_batch_size * _world_size()
        if alg.trajectories_per_step % per_backward:
            raise ValueError(
                f"algorithm.trajectories_per_step={alg.trajectories_per_step} must be a multiple of the "
                f"trajectories of one backward pass over all ranks: algorithm.micro_batch_size="
                f"{alg.micro_batch_size} x {_world_size()} data-parallel ranks"
            )
        return alg.trajectories_per_step // per_backward

    def _optimise(
        self,
        traj: Trajectory,
        step_loss: Callable[[Trajectory, Tensor, int, int], Tensor],
        stats: dict[str, list[float]],
        epoch: int | None = None,
    ) -> dict[str, float]:
        """updates_per_epoch passes of shuffled micro-batches; per micro-batch the gradients of
        step_loss(sub, idx, k, num_trained) accumulate over the trained steps k; per optimizer step they
        accumulate over ``micro_batches_per_step()`` consecutive micro-batches (algorithm.trajectories_per_step),
        each loss divided by their number so that the step's gradient is the mean over its trajectories and
        timesteps, as ddpo-pytorch's accelerate accumulation over gradient_accumulation_steps *
        num_train_timesteps backward passes; then one clipped step. Logged losses are the unscaled ones.

        A step whose loss or gradient norm is not finite is not taken: its gradients are dropped, the
        weights, the optimiser's moments and its step count stay as they were, and its statistics are not
        logged; it counts in learner/skipped_steps. The decision is summed over the data-parallel ranks (the
        gradient norm is the all-reduced one, the same everywhere, but each rank's loss is its own), so all
        ranks skip together. A non-finite reward of x0_hat (the value gradient's prior) stops the run.
        learner/optimizer_steps: the steps taken this epoch."""
        alg = self.cfg.algorithm
        params = self.policy.trainable_parameters()
        stats.setdefault("loss", [])
        stats.setdefault("grad_norm", [])
        accumulate = self.micro_batches_per_step()
        skipped = taken = 0
        for _ in range(alg.updates_per_epoch):
            micro = list(
                torch.randperm(traj.batch_size, generator=self.generator).split(alg.micro_batch_size)
            )
            for start in range(0, len(micro), accumulate):
                group = micro[start : start + accumulate]
                logged = {k: len(v) for k, v in stats.items()}
                self.optimizer.zero_grad(set_to_none=True)
                losses_finite = True
                prior_bad = 0
                for idx in group:
                    sub = traj.index(idx)
                    steps = self._steps(traj.num_steps)
                    self._prior_nonfinite = torch.zeros(len(idx), dtype=torch.bool)
                    for k in steps:
                        loss = step_loss(sub, idx, k, len(steps))
                        (loss / len(group) if len(group) > 1 else loss).backward()
                        stats["loss"].append(loss.item())
                        losses_finite &= math.isfinite(stats["loss"][-1])
                    prior_bad += int(self._prior_nonfinite.sum())
                gn = torch.nn.utils.clip_grad_norm_(params, alg.max_grad_norm)
                stats["grad_norm"].append(float(gn))
                bad_step, bad_prior, rows = sum_over_ranks(
                    [
                        float(not (losses_finite and math.isfinite(float(gn)))),
                        float(prior_bad),
                        float(sum(len(idx) for idx in group)),
                    ]
                )
                if bad_prior:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteError(
                        f"{reward_label(self.cfg)} returned a non-finite score (NaN or inf) of x0_hat (the "
                        f"value gradient's reward prior, value.use_reward_prior) for {int(bad_prior)} of "
                        f"{int(rows)} samples of {'a micro-batch' if len(group) == 1 else 'an optimizer step'} at {epoch_label(self._epoch(epoch))}; the run "
                        "stops before any weight is updated from them (the last checkpoint is intact: --resume "
                        "continues from it)",
                        kind="reward_prior",
                        epoch=self._epoch(epoch),
                        count=int(bad_prior),
                        total=int(rows),
                    )
                if bad_step:
                    self.optimizer.zero_grad(set_to_none=True)
                    for key, n in logged.items():
                        del stats[key][n:]
                    skipped += 1
                    logger.warning(
                        "policy step %d of %s skipped: non-finite loss or gradient norm (%s)",
                        skipped + taken,
                        epoch_label(self._epoch(epoch)),
                        float(gn),
                    )
                    if skipped > alg.max_skipped_steps:
                        raise self._too_many_skipped("policy", skipped, skipped + taken, epoch)
                    continue
                self.optimizer.step()
                taken += 1
        out = {f"learner/{k}": float(np.mean(v)) for k, v in stats.items() if v}
        return {**out, "learner/skipped_steps": float(skipped), "learner/optimizer_steps": float(taken)}

    def _score(self, x: Tensor, t: Tensor, traj: Trajectory) -> Tensor:
        """The action: the guided score s_theta(t, x), float32."""
        dev = self.policy.device
        neg = traj.negative_prompt_embeds.to(dev) if traj.negative_prompt_embeds is not None else None
        eps = self.policy.predict_eps(x, t, traj.prompt_embeds.to(dev), neg, traj.guidance_scale)
        return eps_to_score(eps, alpha_bar(self.policy.schedule, torch.as_tensor(t)).to(dev))

    def _update_value_gradient(self, batch: Batch, epoch: int | None = None) -> dict[str, float]:
        """Continuous-time estimator (README.md, "The method in code"); see ``value_gradient_surrogate``."""
        return self._optimise(batch.traj, self.value_gradient_surrogate, {}, epoch)

    def value_gradient_surrogate(self, sub: Trajectory, idx: Tensor, k: int, num_trained: int) -> Tensor:
        """A scalar whose gradient in theta is minus step k's share of

            grad J = E sum_k h_k (d s_theta / d theta)^T [c1 grad_x V(t_k, x_k) - kl_coef c2 (s_theta - s_ref)],
            c1 = (1 + eta^2)/2 g^2,  c2 = (1 + eta^2)^2 / (4 eta^2) g^2   (both g^2 for eta = 1),
        scaled by N / num_trained when only num_trained of the N steps are trained. Needs no log-probs.
        Deterministic rollouts (eta = 0, heun) only supply states; the policy being optimised is still the
        reverse SDE (eta = 1), whose KL is the regulariser."""
        eta = sub.eta if sub.eta > 0 else 1.0
        t, s = sub.timesteps[k], sub.timesteps[k + 1]
        g2 = float(self.policy.schedule.beta(torch.as_tensor(t)))
        c1 = 0.5 * (1 + eta**2) * g2
        c2 = (1 + eta**2) ** 2 / (4 * eta**2) * g2
        grad_v = self._grad_x_value(sub, k)
        x = sub.latents[:, k].to(self.policy.device)
        s_theta = self._score(x, t, sub)
        with torch.no_grad(), self.policy.reference():
            s_ref = self._score(x, t, sub)
        direction = c1 * grad_v - self.cfg.algorithm.kl_coef * c2 * (s_theta.detach() - s_ref)
        weight = float(t - s) * sub.num_steps / num_trained
        return -(weight * (s_theta * direction).flatten(1).sum(1)).mean()

    def _grad_x_value(self, sub: Trajectory, k: int) -> Tensor:
        """grad_x V(t_k, x) at the stored states (B, ...), float32, detached."""
        dev = self.policy.device
        x = sub.latents[:, k].to(dev).clone().requires_grad_(True)
        t = sub.timesteps[k]
        tb = torch.full((x.shape[0],), float(t), device=dev)
        emb = sub.prompt_embeds.to(dev)
        r_x0 = None
        if self.value_fn.use_reward_prior:
            ab = float(alpha_bar(self.policy.schedule, torch.as_tensor(t)))
            eps = self.policy.predict_eps(x, t, emb, sub.negative_prompt_embeds, sub.guidance_scale)
            x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            # decode and the reward stay in the graph: grad_x V includes cos(pi t/2) grad_x R(decode(x0_hat))
            r_x0 = self.reward_fn(self.policy.decode(x0), sub.prompts)
            if not r_x0.requires_grad and not self._warned_nondifferentiable:
                self._warned_nondifferentiable = True
                logger.warning(
                    "%s is not differentiable (a JPEG size, or scores from a service): the value gradient's "
                    "grad_x V(t, x) = cos(pi t/2) grad_x R(x0_hat) + sin(pi t/2) grad_x F_phi keeps only its "
                    "F_phi term; use a model reward (aesthetic, clip_score, pickscore, hpsv2, imagereward) "
                    "in this process for the reward term, or value.use_reward_prior=false",
                    reward_label(self.cfg),
                )
            # counted, not used: _optimise stops the run (on every rank) once the micro-batch's passes are done
            bad = ~torch.isfinite(r_x0.detach().float().cpu().reshape(len(sub.prompts), -1)).all(1)
            seen = self._prior_nonfinite
            self._prior_nonfinite = seen | bad if seen.shape == bad.shape else bad
        v = self.value_fn(tb, x, emb, r_x0)
        (grad,) = torch.autograd.grad(v.sum(), x)
        return grad.detach().float()

    _warned_nondifferentiable = False  # the warning that grad_x R(x0_hat) is zero, logged once
    reward_fn: RewardFn | None = None  # set by the trainer: needed for grad_x R(x0_hat) in the value gradient
    # rows of the current micro-batch whose R(x0_hat), computed by _grad_x_value, was not finite
    _prior_nonfinite: Tensor = torch.zeros(0, dtype=torch.bool)
