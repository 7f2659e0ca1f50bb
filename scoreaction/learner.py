"""The learner step: value update, then policy update (CTRL ratio / CTRL value-gradient / DDPO).

One process, no Ray. A data-parallel learner is one ``Learner`` per rank, told its rank and world size at
construction: each gets the epoch's whole scored batch, computes the advantages over all of it, draws the
same shuffled micro-batches and learns from its 1/world slice of each; the gradient all-reduce
(``scoreaction.ddp``) makes every rank take the step one learner would take on the whole micro-batch. Works on any policy with the DiffusionPolicy
interface (SD presets and toy-gmm alike).

Precision: trainable weights stay fp32; log-probs, KL and advantages are fp32 whatever the compute dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from scoreaction import value_gradient
from scoreaction.algorithms import (
    PerPromptStatTracker,
    clipped_surrogate,
    lambda_advantages,
    normalize_per_step,
    reward_to_go,
)
from scoreaction.config import Config
from scoreaction.ddp import sum_over_ranks
from scoreaction.nonfinite import NonFiniteError, check_batch, epoch_label, reward_label, too_many_skipped
from scoreaction.rewards import RewardFn
from scoreaction.sampling import Policy, Trajectory, transition
from scoreaction.scoring import Batch
from scoreaction.sde import step_kl
from scoreaction.value import ValueFunction, build_value_optimizer, explained_variance

__all__ = ["Batch", "Learner", "NonFiniteError", "lr_factor"]

logger = logging.getLogger(__name__)


def lr_factor(schedule: str, epoch: int, epochs: int, final_ratio: float) -> float:
    """Multiplier of the policy learning rate at `epoch` (0-based) of `epochs`: 1 at epoch 0, final_ratio at
    the last epoch for the decayed schedules."""
    if schedule == "constant" or epochs <= 1:
        return 1.0
    progress = min(1.0, epoch / (epochs - 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return final_ratio + (1 - final_ratio) * shape


class Learner:
    """Holds the optimisers and the DDPO stat tracker; ``update_value`` and ``update_policy`` run one
    epoch's learning on the epoch's whole scored batch.

    reward_fn: the optimised reward, needed in the graph by the value-gradient estimator (grad_x R(x0_hat));
    its calls are counted in ``reward_queries``. rank, world: this learner's place among the data-parallel
    learner ranks; each takes algorithm.micro_batch_size / world rows of every micro-batch."""

    def __init__(
        self,
        policy: Policy,
        value_fn: ValueFunction,
        cfg: Config,
        reward_fn: RewardFn | None = None,
        *,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.policy, self.value_fn, self.cfg, self.reward_fn = policy, value_fn, cfg, reward_fn
        alg = cfg.algorithm
        if world < 1 or not 0 <= rank < world or alg.micro_batch_size % world:
            raise ValueError(
                f"learner rank {rank} of {world}: the world size must divide algorithm.micro_batch_size="
                f"{alg.micro_batch_size} (resources.num_learner_workers) and 0 <= rank < world"
            )
        self.rank, self.world = rank, world
        self.reward_queries = 0  # images scored by reward_fn here (the value gradient's R(x0_hat))
        self.optimizer = torch.optim.AdamW(
            policy.trainable_parameters(), lr=alg.learning_rate, weight_decay=alg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda epoch: lr_factor(alg.lr_schedule, epoch, cfg.run.epochs, alg.lr_final_ratio),
        )
        self.value_optimizer = build_value_optimizer(value_fn, cfg.value)
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

    def check_batch(self, batch: Batch, epoch: int | None = None) -> None:
        """Raise NonFiniteError on a non-finite reward, x0_hat prior or rollout in the (whole) batch, before
        anything is learned from it (``scoreaction.nonfinite.check_batch``)."""
        check_batch(batch, self.cfg, self._epoch(epoch))

    def micro_batches(self, batch_size: int, size: int) -> list[Tensor]:
        """One pass over the whole batch in shuffled micro-batches of `size` rows, and of each this rank's
        contiguous 1/world: every rank draws the same permutation (the same generator), so the ranks' slices
        of a micro-batch make up the micro-batch one learner would take, and the averaged gradient is its
        gradient. world divides every micro-batch (it divides run.num_samples and micro_batch_size)."""
        out = []
        for idx in torch.randperm(batch_size, generator=self.generator).split(size):
            m = len(idx) // self.world
            out.append(idx[self.rank * m : (self.rank + 1) * m])
        return out

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
            v = self.value_fn(t, x, emb, r_x0, prompts=[p for p in traj.prompts for _ in range(n)]).view(b, n)
        return torch.cat([v, batch.rewards.float().to(dev)[:, None]], dim=1)

    def update_value(self, batch: Batch, epoch: int | None = None) -> dict[str, float]:
        """Regress V(t_k, x_k) to the reward-to-go r - kl_coef * sum_{j>=k} KL_j (k < N).

        epoch: the epoch the batch belongs to (named by errors; default: the policy updates so far). A step
        whose loss or gradient is not finite is skipped (value/skipped_steps). Each rank regresses on its
        slice of every micro-batch; the gradient all-reduce averages the ranks' steps."""
        self.check_batch(batch, epoch)
        vcfg, kl_coef = self.cfg.value, self.cfg.algorithm.kl_coef
        params = [p for p in self.value_fn.parameters() if p.requires_grad]
        skipped = steps = 0
        target = reward_to_go(batch.rewards.float(), batch.traj.extras["kl"].float(), kl_coef)[:, :-1]
        b = batch.traj.batch_size
        losses = []
        mb = max(1, min(b, self.cfg.algorithm.micro_batch_size * 8))
        for _ in range(vcfg.updates_per_epoch):
            for idx in self.micro_batches(b, mb):
                sub = batch.index(idx)
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
                        raise too_many_skipped(self.cfg, "value-function", skipped, steps, self._epoch(epoch))
                    continue
                self.value_optimizer.step()
                losses.append(loss.item())
        pred = self.values(batch)[:, :-1].cpu()  # the whole batch: the same number on every rank
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
        """Normalised, clipped advantages (B, N) of the whole batch and the per-step normalisation std (N,)
        of the ratio estimator: lambda-weighted TD advantages for ctrl (normalised per step index over the
        batch), the tracker's for ddpo (which updates the tracker). Raises NonFiniteError on a non-finite
        reward first."""
        self.check_batch(batch, epoch)
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

    def update_policy(self, batch: Batch, epoch: int | None = None) -> dict[str, float]:
        """One epoch's policy update from the epoch's whole scored batch; then the learning-rate schedule
        advances by one epoch. The ratio estimators compute the advantages over the whole batch; every rank learns
        from its slice of every micro-batch (so N ranks take the steps one learner would).

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
            metrics = self._update_ratio(batch, self.advantages(batch, epoch), epoch)
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
        algorithm.micro_batch_size (the micro-batch over all ranks: each rank takes micro_batch_size / world
        rows of it); 1 when trajectories_per_step is None."""
        alg = self.cfg.algorithm
        if alg.trajectories_per_step is None:
            return 1
        if alg.trajectories_per_step % alg.micro_batch_size:
            raise ValueError(
                f"algorithm.trajectories_per_step={alg.trajectories_per_step} must be a multiple of "
                f"algorithm.micro_batch_size={alg.micro_batch_size}"
            )
        return alg.trajectories_per_step // alg.micro_batch_size

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
            micro = self.micro_batches(traj.batch_size, alg.micro_batch_size)
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
                        raise too_many_skipped(
                            self.cfg, "policy", skipped, skipped + taken, self._epoch(epoch)
                        )
                    continue
                self.optimizer.step()
                taken += 1
        out = {f"learner/{k}": float(np.mean(v)) for k, v in stats.items() if v}
        return {**out, "learner/skipped_steps": float(skipped), "learner/optimizer_steps": float(taken)}

    def _update_value_gradient(self, batch: Batch, epoch: int | None = None) -> dict[str, float]:
        """Continuous-time estimator (README.md, "The method in code"): ``value_gradient.surrogate``."""
        return self._optimise(batch.traj, self.value_gradient_surrogate, {}, epoch)

    def value_gradient_surrogate(self, sub: Trajectory, idx: Tensor, k: int, num_trained: int) -> Tensor:
        return value_gradient.surrogate(self, sub, k, num_trained)

    _warned_nondifferentiable = False  # the warning that grad_x R(x0_hat) is zero, logged once
    # rows of the current micro-batch whose R(x0_hat), computed by _grad_x_value, was not finite
    _prior_nonfinite: Tensor = torch.zeros(0, dtype=torch.bool)
