"""What one run is made of, built from its config: the policy, the value function F_phi and the prompts of
each epoch. Both backends (in-process and Ray) and every actor build them here, so that
the same config gives the same objects everywhere.
"""

from __future__ import annotations

import torch

from scoreaction.config import Config
from scoreaction.models.toy_gmm import ToyPolicy
from scoreaction.policy import DiffusionPolicy
from scoreaction.sampling import Policy
from scoreaction.value import ValueFunction
from scoreaction.value_networks import ImageRewardValue, build_imagereward_value


def build_policy(cfg: Config) -> Policy:
    """The diffusion policy (LoRA or full fine-tuning on the model's pipeline), or the toy GMM policy."""
    if cfg.model.preset == "toy-gmm":
        return ToyPolicy(cfg.model.toy, cfg.policy, seed=cfg.run.seed)
    return DiffusionPolicy.from_config(cfg.model, cfg.policy)


def build_value_function(cfg: Config, policy: Policy) -> ValueFunction | ImageRewardValue:
    """F_phi of value.kind: the conv head on the policy's latent shape and prompt embedding, seeded by run.seed
    (the same on every rank), or the ImageReward copy on the decoded state (``scoreaction.value_networks``)."""
    if cfg.value.kind == "imagereward":
        return build_imagereward_value(cfg, policy)
    shape = policy.latent_shape(cfg.sampler.height, cfg.sampler.width)
    embed_dim = int(policy.encode_prompts([""]).shape[-1])
    torch.manual_seed(cfg.run.seed + 2)
    return ValueFunction(shape, embed_dim, cfg.value.hidden, cfg.value.use_reward_prior).to(policy.device)


def epoch_prompts(cfg: Config, epoch: int, num_samples: int | None = None) -> list[str]:
    """The prompts of an epoch, round robin over run.prompts (continuing across epochs)."""
    ps, n = cfg.run.prompts, cfg.run.num_samples
    return [ps[(epoch * n + i) % len(ps)] for i in range(n)][: num_samples or n]
