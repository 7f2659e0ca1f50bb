"""The shared reward service: scoreaction's rewards as a Ray Serve application.

    serve run serve/rewards.yaml            # or: serve deploy serve/rewards.yaml on a running cluster

One deployment, ``RewardServer``, holds the configured reward models (built once per replica, on its GPU
when it has one) and answers

- ``POST /score`` and ``GET /rewards`` over HTTP (FastAPI; the wire format is in
  ``scoreaction/rewards/service_client.py``), and
- ``handle.score.remote(reward, images, prompts)`` / ``handle.served_rewards.remote()`` through a
  ``DeploymentHandle`` (``serve.get_app_handle("rewards")``) from inside the cluster.

Requests from all callers are grouped by ``@serve.batch`` (dynamic batching: up to ``max_batch_size``
requests, waiting at most ``batch_wait_timeout_s``), and requests for the same reward and image size are
scored in one forward pass. Replicas autoscale on ongoing requests (``autoscaling_config`` in the YAML).
A fine-tuning job uses it with ``reward.service=http://HOST:8000/rewards`` or ``reward.service=rewards``.
"""

import asyncio
import logging
from collections import Counter
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve
from torch import Tensor

from scoreaction.reward_config import RewardConfig
from scoreaction.rewards import IMAGE_REWARDS, RewardError, build_named, check_images
from scoreaction.rewards.service_client import decode_images

logger = logging.getLogger(__name__)

api = FastAPI(title="scoreaction rewards", description="Score images with scoreaction's reward models.")


class ScoreRequest(BaseModel):
    reward: str = Field(description="Reward name, one the service serves (GET /rewards).")
    prompts: list[str] = Field(description="One prompt per image.")
    images: dict[str, Any] = Field(description='{"dtype": "float32", "shape": [B, 3, H, W], "data": base64}')


@serve.deployment(name="RewardServer", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class RewardServer:
    """Serves ``rewards`` (names) built with the options of ``reward_config`` (a RewardConfig dict)."""

    def __init__(self, rewards: list[str], reward_config: dict | None = None) -> None:
        unknown = [r for r in rewards if r not in IMAGE_REWARDS]
        if unknown or not rewards:
            raise RewardError(f"rewards={rewards!r}: give a non-empty list of {', '.join(IMAGE_REWARDS)}")
        cfg = RewardConfig.model_validate({**(reward_config or {}), "service": None})
        self.rewards = {name: build_named(name, cfg) for name in rewards}
        self.batch_sizes: Counter[int] = Counter()  # requests per @serve.batch call -> count
        logger.info("reward server up with %s", ", ".join(self.rewards))

    async def reconfigure(self, user_config: dict) -> None:
        """user_config: {max_batch_size, batch_wait_timeout_s}; applied without a restart."""
        if "max_batch_size" in user_config:
            self._batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def served_rewards(self) -> list[str]:
        return list(self.rewards)

    def stats(self) -> dict[str, Any]:
        """How requests were batched so far: {"batch_sizes": {requests_per_batch: count}}."""
        return {"batch_sizes": dict(self.batch_sizes)}

    async def score(self, reward: str, images: Tensor, prompts: list[str]) -> dict[str, Any]:
        """images: (B, 3, H, W) float in [0, 1] -> {"scores": (B,) float32, "info": {name: (B,)}}."""
        if reward not in self.rewards:
            raise RewardError(f"reward={reward!r} is not served here; served: {', '.join(self.rewards)}")
        check_images(images, prompts)
        return await self._batched((reward, images.to(torch.float32), list(prompts)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list[tuple[str, Tensor, list[str]]]) -> list[dict[str, Any]]:
        """Score every request of a batch; requests with the same reward and image size share one pass."""
        self.batch_sizes[len(requests)] += 1
        groups: dict[tuple, list[int]] = {}
        for i, (name, images, _) in enumerate(requests):
            groups.setdefault((name, *images.shape[1:]), []).append(i)
        results: list[dict[str, Any]] = [{} for _ in requests]
        for (name, *_), idx in groups.items():
            images = torch.cat([requests[i][1] for i in idx])
            prompts = [p for i in idx for p in requests[i][2]]
            out = await asyncio.to_thread(self.rewards[name].score, images, prompts)
            start = 0
            for i in idx:
                n = requests[i][1].shape[0]
                results[i] = {
                    "scores": out.scores[start : start + n].detach().cpu(),
                    "info": {k: v[start : start + n].detach().cpu() for k, v in out.info.items()},
                }
                start += n
        return results

    @api.get("/rewards")
    def http_rewards(self) -> dict[str, list[str]]:
        return {"rewards": self.served_rewards()}

    @api.post("/score")
    async def http_score(self, request: ScoreRequest) -> dict[str, Any]:
        try:
            images = decode_images(request.images)
            out = await self.score(request.reward, images, request.prompts)
        except RewardError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return {
            "reward": request.reward,
            "scores": out["scores"].tolist(),
            "info": {k: v.tolist() for k, v in out["info"].items()},
        }


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``import_path: serve.rewards_app:build_app``.

    args: {"rewards": [names] or "a,b", "reward_config": {RewardConfig fields: device, batch_size,
    aesthetic: {...}, ...}}.
    """
    rewards = args.get("rewards", ["jpeg_compressibility", "jpeg_incompressibility"])
    if isinstance(rewards, str):
        rewards = [r.strip() for r in rewards.split(",") if r.strip()]
    return RewardServer.bind(list(rewards), dict(args.get("reward_config") or {}))
