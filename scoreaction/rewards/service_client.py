"""Client of the shared reward service (serve/rewards_app.py), and the wire format both sides use.

``reward.service`` is either

- an ``http(s)://host:port/route`` URL: JSON over HTTP (``POST {url}/score``, ``GET {url}/rewards``); or
- a Ray Serve application name: a ``DeploymentHandle`` from ``serve.get_app_handle(name)``, which works in
  a process connected to the Ray cluster that runs the app (a job's driver or its actors).

Images travel as raw float32 bytes (base64 in JSON), so the service scores exactly the tensor the client
holds and its scores equal an in-process call's. Nothing is pickled over HTTP.

    POST {url}/score   {"reward": "aesthetic", "prompts": [...], "images": {"dtype": "float32",
                        "shape": [B, 3, H, W], "data": "<base64 of little-endian float32>"}}
                    -> {"reward": "aesthetic", "scores": [B floats], "info": {name: [B floats]}}
    GET  {url}/rewards -> {"rewards": [names served]}
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from torch import Tensor

from scoreaction.rewards.base import Reward, RewardError, RewardOutput

logger = logging.getLogger(__name__)

MAX_RETRIES_503 = 5


def encode_images(images: Tensor) -> dict:
    """(B, 3, H, W) float tensor -> {"dtype": "float32", "shape": [...], "data": base64 float32 bytes}."""
    x = images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"dtype": "float32", "shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode("ascii")}


def decode_images(obj: dict) -> Tensor:
    """Inverse of encode_images, with a clear error for a malformed payload."""
    if not isinstance(obj, dict) or obj.get("dtype") != "float32":
        got = obj.get("dtype") if isinstance(obj, dict) else type(obj).__name__
        raise RewardError(f"images.dtype={got!r}; allowed: 'float32' (raw little-endian float32 bytes)")
    shape = obj.get("shape")
    if not (
        isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s >= 0 for s in shape)
    ):
        raise RewardError(f"images.shape={shape!r} must be [B, 3, H, W] (non-negative integers)")
    try:
        raw = base64.b64decode(obj.get("data", ""), validate=True)
    except (ValueError, TypeError) as exc:
        raise RewardError(f"images.data is not valid base64 ({exc})") from None
    expected = 4 * int(np.prod(shape))
    if len(raw) != expected:
        raise RewardError(f"images.data holds {len(raw)} bytes; shape {shape} needs {expected} (float32)")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32))


class HttpReward(Reward):
    """A reward scored by the rewards app over HTTP."""

    def __init__(self, url: str, name: str, timeout_s: float = 300.0) -> None:
        self.url, self.name, self.timeout_s = url.rstrip("/"), name, timeout_s
        served = self._request("GET", "/rewards")["rewards"]
        if name not in served:
            raise RewardError(
                f"reward service {self.url} does not serve {name!r}; it serves: {', '.join(served)} "
                "(add it to the app's `rewards` list in serve/rewards.yaml)"
            )

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        for attempt in range(MAX_RETRIES_503 + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if exc.code == 503 and attempt < MAX_RETRIES_503:  # Serve's queue is full: back off
                    time.sleep(0.2 * 2**attempt)
                    continue
                raise RewardError(
                    f"reward service {self.url}{path} answered HTTP {exc.code}: {detail}"
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                raise RewardError(
                    f"reward.service={self.url!r}: cannot reach it ({getattr(exc, 'reason', exc)}); is the "
                    "rewards app running (serve run serve/rewards.yaml) and the URL its route prefix?"
                ) from None
        raise AssertionError("unreachable")

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        _no_grad(images)
        out = self._request(
            "POST", "/score", {"reward": self.name, "prompts": prompts, "images": encode_images(images)}
        )
        scores = torch.tensor(out["scores"], dtype=torch.float32, device=images.device)
        info = {k: torch.tensor(v, device=images.device) for k, v in out.get("info", {}).items()}
        return RewardOutput(scores, info)


class HandleReward(Reward):
    """A reward scored by the rewards app through a Ray Serve DeploymentHandle (same Ray cluster)."""

    def __init__(self, app_name: str, name: str, timeout_s: float = 300.0) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            raise RewardError(
                f"reward.service={app_name!r} names a Ray Serve application, which works only in a process "
                "connected to the Ray cluster running it (a Ray job, or after ray.init(address=...)); from "
                "outside the cluster use its URL, e.g. reward.service=http://HOST:8000/rewards"
            )
        try:
            self.handle = serve.get_app_handle(app_name)
        except Exception as exc:  # RayServeException: no such application
            raise RewardError(
                f"reward.service={app_name!r}: no running Serve application of that name ({exc}); "
                "start it with serve run serve/rewards.yaml"
            ) from None
        self.app_name, self.name, self.timeout_s = app_name, name, timeout_s
        served = self.handle.served_rewards.remote().result(timeout_s=timeout_s)
        if name not in served:
            raise RewardError(
                f"reward service app {app_name!r} does not serve {name!r}; it serves: {', '.join(served)}"
            )

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        _no_grad(images)
        cpu = images.detach().to("cpu", torch.float32)
        out = self.handle.score.remote(self.name, cpu, prompts).result(timeout_s=self.timeout_s)
        info = {k: v.to(images.device) for k, v in out["info"].items()}
        return RewardOutput(out["scores"].to(images.device), info)


def _no_grad(images: Tensor) -> None:
    if images.requires_grad:
        raise RewardError(
            "reward.service returns no gradients, but the images require grad (algorithm.estimator="
            "'value_gradient' with value.use_reward_prior=true); score in-process (unset reward.service)"
        )


def service_reward(service: str, name: str, timeout_s: float = 300.0) -> Reward:
    """The client for reward ``name`` of the service at ``service`` (URL or Serve app name)."""
    if service.startswith(("http://", "https://")):
        return HttpReward(service, name, timeout_s)
    return HandleReward(service, name, timeout_s)
