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

An outage pauses the caller instead of failing it. One call (``reward(images, prompts)``) has one deadline,
``reward.service_timeout_s`` (600 s by default), for all its attempts: connection errors (refused, reset,
dropped mid-answer), an attempt that gets no bytes for ``reward.service_attempt_timeout_s``, and the
answers 408/429/502/503/504 are retried, after the service's ``Retry-After`` when it sends one, else after
an exponential backoff (0.5 s doubling, at most ``reward.service_max_backoff_s``, jittered). Each retry logs
a warning saying it is waiting for the service. Other answers (400, 401, 422, ...) fail at once with the
service's message; a 413 (body over the service's limit) splits the batch in halves. The answer must hold
exactly one finite score per image, else the call fails naming the service, the counts and the bad images.
Scoring is a pure function of the request, so a retried request is harmless.

The API key (``Authorization: Bearer``) is read from the environment variable named by
``reward.service_api_key_env`` (``SCOREACTION_API_KEY`` by default) at each request; it is never part of
the config, the logs or an error message.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import math
import os
import random
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from scoreaction.rewards.base import Reward, RewardError, RewardOutput

if TYPE_CHECKING:
    from scoreaction.config.reward import RewardConfig

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
FIRST_BACKOFF_S = 0.5
T = TypeVar("T")


def encode_images(images: Tensor) -> dict:
    """(B, 3, H, W) float tensor -> {"dtype": "float32", "shape": [...], "data": base64 float32 bytes}."""
    x = images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"dtype": "float32", "shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode("ascii")}


class _Retry(Exception):
    """A failed attempt worth retrying: why, and the wait the service asked for (Retry-After), if any."""

    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.why, self.retry_after = why, retry_after


class _TooLarge(Exception):
    """HTTP 413: the request body is over the service's limit."""


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header (delay in seconds, or an HTTP date) in seconds; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def backoff_s(retry: int, max_backoff_s: float) -> float:
    """The pause before retry number ``retry`` (1, 2, ...) when the service gave no Retry-After."""
    return min(max_backoff_s, FIRST_BACKOFF_S * 2 ** min(retry - 1, 30)) * random.uniform(0.75, 1.0)


class RetryPolicy:
    """One deadline for a whole call, a per-attempt timeout, backoff honouring Retry-After."""

    def __init__(
        self, timeout_s: float = 600.0, attempt_timeout_s: float = 120.0, max_backoff_s: float = 30.0
    ):
        self.timeout_s, self.attempt_timeout_s, self.max_backoff_s = (
            timeout_s,
            attempt_timeout_s,
            max_backoff_s,
        )

    def run(self, where: str, attempt: Callable[[float, float], T], deadline: float | None = None) -> T:
        """attempt(timeout_s, deadline) until it returns; it raises _Retry for a failure worth retrying.

        ``deadline`` (time.monotonic()) is shared by the calls of one reward call (a split batch)."""
        start = time.monotonic()
        deadline = start + self.timeout_s if deadline is None else deadline
        retries = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return attempt(max(0.001, min(self.attempt_timeout_s, remaining)), deadline)
            except _Retry as exc:
                retries += 1
                wait = (
                    exc.retry_after if exc.retry_after is not None else backoff_s(retries, self.max_backoff_s)
                )
                remaining = deadline - time.monotonic()
                if wait >= remaining:
                    raise RewardError(
                        f"reward service {where}: no answer within reward.service_timeout_s={self.timeout_s:g} s "
                        f"({retries} attempts over {time.monotonic() - start:.0f} s; last: {exc.why}); is the "
                        "rewards app running (serve run serve/rewards.yaml) and reward.service its URL or name?"
                    ) from None
                logger.warning(
                    "reward service %s: %s; waiting %.1f s for the service (retry %d, %.0f s left of "
                    "reward.service_timeout_s=%g s)",
                    where,
                    exc.why,
                    wait,
                    retries,
                    remaining,
                    self.timeout_s,
                )
                time.sleep(wait)


def check_scores(raw: object, n: int, where: str, name: str) -> list[float]:
    """Exactly one finite number per image, else a RewardError naming the service, counts and bad images."""
    if not isinstance(raw, list | tuple) or len(raw) != n:
        got = f"{len(raw)} scores" if isinstance(raw, list | tuple) else f"scores={str(raw)[:80]!r}"
        raise RewardError(
            f"reward service {where} returned {got} for {n} images (reward {name!r}); "
            "expected exactly one score per image"
        )
    bad = {
        i: v
        for i, v in enumerate(raw)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
    }
    if bad:
        shown = ", ".join(f"image {i}: {'null' if v is None else repr(v)}" for i, v in list(bad.items())[:10])
        raise RewardError(
            f"reward service {where} returned {len(bad)} non-finite scores of {n} (reward {name!r}): "
            f"{shown}{' ...' if len(bad) > 10 else ''}; null stands for NaN or inf (JSON has neither)"
        )
    return [float(v) for v in raw]


def _info(raw: object, n: int) -> dict[str, list[float]]:
    """Per-image metadata of an answer, {name: n numbers} (non-finite ones as NaN); malformed entries dropped."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        if isinstance(v, list) and len(v) == n:
            out[str(k)] = [float(x) if isinstance(x, int | float) else math.nan for x in v]
    return out


class HttpReward(Reward):
    """A reward scored by the rewards app over HTTP, with retries under one deadline per call."""

    def __init__(
        self,
        url: str,
        name: str,
        timeout_s: float = 600.0,
        attempt_timeout_s: float = 120.0,
        max_backoff_s: float = 30.0,
        api_key_env: str = "SCOREACTION_API_KEY",
    ) -> None:
        self.url, self.name, self.api_key_env = url.rstrip("/"), name, api_key_env
        self.policy = RetryPolicy(timeout_s, attempt_timeout_s, max_backoff_s)
        served = self._request("GET", "/rewards").get("rewards")
        if not isinstance(served, list):
            raise RewardError(f"reward service {self.url}/rewards answered {str(served)[:200]!r}, not a list")
        if name not in served:
            raise RewardError(
                f"reward service {self.url} does not serve {name!r}; it serves: {', '.join(map(str, served))} "
                "(add it to the app's `rewards` list in serve/rewards.yaml)"
            )

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _request(
        self, method: str, path: str, body: dict | None = None, deadline: float | None = None
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None

        def attempt(timeout: float, deadline: float) -> Any:
            return self._attempt(method, path, data, timeout, deadline)

        return self.policy.run(self.url + path, attempt, deadline)

    def _attempt(self, method: str, path: str, data: bytes | None, timeout: float, deadline: float) -> Any:
        where = self.url + path
        req = urllib.request.Request(where, data=data, method=method, headers=self._headers())
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            detail = _detail(exc)
            if exc.code in RETRY_STATUSES:
                raise _Retry(
                    f"HTTP {exc.code} ({detail})", retry_after_s(exc.headers.get("Retry-After"))
                ) from None
            if exc.code == 413:
                raise _TooLarge(detail) from None
            if exc.code == 401:
                state = (
                    "is set but the service rejects it" if os.environ.get(self.api_key_env) else "is not set"
                )
                raise RewardError(
                    f"reward service {where} answered HTTP 401 ({detail}): the API key comes from the environment "
                    f"variable ${self.api_key_env} (reward.service_api_key_env), which {state} here"
                ) from None
            raise RewardError(f"reward service {where} answered HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise RewardError(
                    f"reward service {where}: TLS certificate rejected ({exc.reason})"
                ) from None
            raise _Retry(f"cannot reach it ({exc.reason})") from None
        except (
            OSError,
            http.client.HTTPException,
        ) as exc:  # timed out, reset, dropped before the status line
            raise _Retry(f"cannot reach it ({type(exc).__name__}: {exc})") from None
        chunks = []
        with resp:
            while True:
                try:
                    chunk = resp.read(1 << 20)  # each read waits at most `timeout`
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retry(f"the answer was cut off ({type(exc).__name__}: {exc})") from None
                if not chunk:
                    break
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise _Retry("the answer is still arriving at the deadline")
            if resp.length:  # the connection closed before Content-Length bytes came (read() does not raise)
                raise _Retry(f"the answer was cut off ({resp.length} bytes missing)")
        text = b"".join(chunks)
        try:
            return json.loads(text)
        except ValueError:
            raise RewardError(
                f"reward service {where} answered {resp.status} with non-JSON {text[:200]!r}"
            ) from None

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        _no_grad(images)
        deadline = time.monotonic() + self.policy.timeout_s
        scores, info = self._score_batch(images, prompts, deadline)
        return RewardOutput(
            torch.tensor(scores, dtype=torch.float32, device=images.device),
            {k: torch.tensor(v, device=images.device) for k, v in info.items()},
        )

    def _score_batch(
        self, images: Tensor, prompts: list[str], deadline: float
    ) -> tuple[list[float], dict[str, list[float]]]:
        n = images.shape[0]
        body = {"reward": self.name, "prompts": prompts, "images": encode_images(images)}
        try:
            out = self._request("POST", "/score", body, deadline)
        except _TooLarge as exc:
            if n == 1:
                raise RewardError(
                    f"reward service {self.url}/score: one {tuple(images.shape[1:])} image is over its body limit "
                    f"({exc}); raise max_body_bytes in serve/rewards.yaml"
                ) from None
            logger.warning(
                "reward service %s: %d images are over its body limit; sending two halves", self.url, n
            )
            h = n // 2
            s1, i1 = self._score_batch(images[:h], prompts[:h], deadline)
            s2, i2 = self._score_batch(images[h:], prompts[h:], deadline)
            return s1 + s2, {k: i1[k] + i2[k] for k in i1.keys() & i2.keys()}
        if not isinstance(out, dict):
            raise RewardError(f"reward service {self.url}/score answered {str(out)[:200]!r}, not an object")
        return check_scores(out.get("scores"), n, self.url, self.name), _info(out.get("info"), n)


def _detail(exc: urllib.error.HTTPError) -> str:
    """The error message of an HTTP error answer (our JSON error shape, or the raw text), shortened."""
    try:
        text = exc.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return exc.reason or ""
    try:
        message = json.loads(text)["error"]["message"]
        return str(message)[:500]
    except (ValueError, KeyError, TypeError):
        return text[:500]


class HandleReward(Reward):
    """A reward scored by the rewards app through a Ray Serve DeploymentHandle (same Ray cluster)."""

    def __init__(
        self,
        app_name: str,
        name: str,
        timeout_s: float = 600.0,
        attempt_timeout_s: float = 120.0,
        max_backoff_s: float = 30.0,
    ) -> None:
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
        self.app_name, self.name = app_name, name
        self.policy = RetryPolicy(timeout_s, attempt_timeout_s, max_backoff_s)
        served = self._call(lambda h: h.served_rewards.remote())
        if name not in served:
            raise RewardError(
                f"reward service app {app_name!r} does not serve {name!r}; it serves: {', '.join(served)}"
            )

    def _call(self, call: Callable[[Any], Any]) -> Any:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        def attempt(timeout: float, deadline: float) -> Any:
            response = call(self.handle)
            try:
                return response.result(timeout_s=timeout)
            except BackPressureError as exc:
                raise _Retry(f"overloaded ({exc.message})", exc.retry_after_s) from None
            except (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError) as exc:
                raise _Retry(f"unavailable ({type(exc).__name__})") from None
            except (GetTimeoutError, TimeoutError):
                response.cancel()
                raise _Retry(f"no answer within reward.service_attempt_timeout_s={timeout:g} s") from None

        return self.policy.run(f"app {self.app_name!r}", attempt)

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        _no_grad(images)
        cpu = images.detach().to("cpu", torch.float32)
        out = self._call(lambda h: h.score.remote(self.name, cpu, prompts))
        n = images.shape[0]
        scores = check_scores(out["scores"].double().tolist(), n, f"app {self.app_name!r}", self.name)
        info = {k: v.to(images.device) for k, v in out["info"].items()}
        return RewardOutput(torch.tensor(scores, dtype=torch.float32, device=images.device), info)


def _no_grad(images: Tensor) -> None:
    if images.requires_grad:
        raise RewardError(
            "reward.service returns no gradients, but the images require grad (algorithm.estimator="
            "'value_gradient' with value.use_reward_prior=true); score in-process (unset reward.service)"
        )


def service_reward(service: str, name: str, cfg: RewardConfig | float | None = None) -> Reward:
    """The client for reward ``name`` of the service at ``service`` (URL or Serve app name).

    cfg: the reward section (its service_* fields: deadline, attempt timeout, backoff, API-key variable),
    or just the whole-call deadline in seconds."""
    if cfg is None or isinstance(cfg, int | float):
        opts: dict[str, Any] = {} if cfg is None else {"timeout_s": float(cfg)}
        key_env: dict[str, Any] = {}
    else:
        opts = {
            "timeout_s": cfg.service_timeout_s,
            "attempt_timeout_s": cfg.service_attempt_timeout_s,
            "max_backoff_s": cfg.service_max_backoff_s,
        }
        key_env = {"api_key_env": cfg.service_api_key_env}
    if service.startswith(("http://", "https://")):
        return HttpReward(service, name, **opts, **key_env)
    return HandleReward(service, name, **opts)
