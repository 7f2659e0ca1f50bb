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

What the HTTP side guarantees (the image service's guard, serve/web.py, shared):

- API key: when ``$SCOREACTION_API_KEY`` is set in the replica's environment every request needs
  ``Authorization: Bearer <key>`` (401 otherwise, compared in constant time).
- Body limit: a body over ``max_body_bytes`` (Content-Length or counted while streaming) answers 413.
- Bounded work: a replica holding ``max_pending_requests`` HTTP requests answers 503 with ``Retry-After:
  retry_after_s`` at once; beyond ``max_ongoing_requests`` Serve queues at most ``max_queued_requests``
  per caller and then answers 503 + Retry-After itself (its ``backpressure_config``; a plain-text body).
- Validated input: the JSON, every field's type, the image shape (``[B, 3, H, W]``, 1 <= B <= max_images,
  8 <= H, W <= max_image_side), the data length, the pixel range and the prompts (one valid Unicode string
  per image) are checked before any model runs; a bad request answers 400/422 naming the field.
- Every error answer is the JSON shape ``{"error": {"message", "type", "param", "code"}}`` and always
  encodes (values are echoed escaped, lone surrogates included). A reward model that returns a non-finite
  score sends it as ``null``: the client turns that into an error naming the images.
"""

import asyncio
import base64
import json
import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from scoreaction.config.reward import RewardConfig
from scoreaction.rewards import IMAGE_REWARDS, RewardError, build_named, check_images
from serve.web import GuardMiddleware, error_response

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 8
MAX_PROMPT_CHARS = 10_000


class RewardServiceArgs(BaseModel):
    """Deploy-time arguments (the builder's ``args``); changing them redeploys the replicas."""

    model_config = ConfigDict(extra="forbid")

    rewards: list[str] = Field(
        default_factory=lambda: ["jpeg_compressibility", "jpeg_incompressibility"],
        min_length=1,
        description="Rewards this service scores (each replica builds all of them once).",
    )
    reward_config: dict[str, Any] = Field(
        default_factory=dict,
        description="RewardConfig options: device, dtype, batch_size, weights of each model.",
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, le=2**31, description="Largest request body; larger ones answer 413."
    )
    max_images: int = Field(
        4096,
        ge=1,
        le=65536,
        description="Most images in one request (B); the body limit usually binds first.",
    )
    max_image_side: int = Field(
        2048, ge=MIN_IMAGE_SIDE, le=16384, description="Largest image height or width in pixels."
    )


class RewardServiceSettings(BaseModel):
    """Hot-reloadable settings (the deployment's ``user_config``, applied by ``reconfigure``)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests batched into one scoring call.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="How long a batch waits to fill.")
    max_pending_requests: int = Field(
        32,
        ge=1,
        le=100_000,
        description="HTTP requests a replica holds at once (scoring or waiting); more answer 503 + Retry-After. "
        "Keep it below the deployment's max_ongoing_requests, or Serve's own queue answers first.",
    )
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After of the 503 answers (overload).")


_LIMITS: dict[str, int] = {"max_body_bytes": RewardServiceArgs.model_fields["max_body_bytes"].default}


def _safe(text: str) -> str:
    """Text that always encodes as UTF-8 (lone surrogates become \\udXXX escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _show(value: object, max_chars: int = 80) -> str:
    """A request value echoed in an error: its repr (escapes surrogates and control characters), cut."""
    text = repr(value)
    return text if len(text) <= max_chars else f"{text[:max_chars]}... ({type(value).__name__})"


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None, **kw
) -> JSONResponse:
    return error_response(status, _safe(message), param=_safe(param) if param else None, code=code, **kw)


class BadRequest(RewardError):
    """A request field that fails validation: ``field`` names it, the message says what is allowed."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.status = field, status


api = FastAPI(title="scoreaction rewards", description="Score images with scoreaction's reward models.")
api.add_middleware(GuardMiddleware, max_body_bytes=lambda: _LIMITS["max_body_bytes"])


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; routes: POST /score, GET /rewards"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return _error(exc.status_code, message, headers=getattr(exc, "headers", None))


api.add_exception_handler(StarletteHTTPException, _http_error)


def decode_images(obj: object, max_images: int = 4096, max_side: int = 2048) -> Tensor:
    """The request's ``images`` ({"dtype": "float32", "shape": [B, 3, H, W], "data": base64}) as a tensor.

    Raises BadRequest naming the field for anything else: other keys or dtypes, a shape that is not four
    positive integers within the limits, data that is not base64 or whose length does not match the shape.
    """
    if not isinstance(obj, dict):
        raise BadRequest("images", f"images={_show(obj)}: must be an object {{dtype, shape, data}}")
    extra = sorted(set(obj) - {"dtype", "shape", "data"})
    if extra:
        raise BadRequest("images", f"images has unknown keys {_show(extra)}; allowed: dtype, shape, data")
    for key in ("dtype", "shape", "data"):
        if key not in obj:
            raise BadRequest(f"images.{key}", f"images.{key} is missing")
    if obj["dtype"] != "float32":
        raise BadRequest(
            "images.dtype",
            f"images.dtype={_show(obj['dtype'])}; allowed: 'float32' (raw little-endian float32 bytes)",
            status=400,
        )
    shape = obj["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(s) is int for s in shape)):
        raise BadRequest(
            "images.shape", f"images.shape={_show(shape)} must be a list of 4 integers [B, 3, H, W]"
        )
    b, c, h, w = shape
    if not (1 <= b <= max_images and c == 3 and all(MIN_IMAGE_SIDE <= s <= max_side for s in (h, w))):
        raise BadRequest(
            "images.shape",
            f"images.shape={_show(shape)} is out of range; allowed: [B, 3, H, W] with 1 <= B <= {max_images} "
            f"and {MIN_IMAGE_SIDE} <= H, W <= {max_side}",
            status=400,
        )
    data = obj["data"]
    if not isinstance(data, str):
        raise BadRequest("images.data", f"images.data must be a base64 string, got {type(data).__name__}")
    expected = 4 * math.prod(shape)
    if len(data) != 4 * ((expected + 2) // 3):  # checked before decoding: no work for a mismatched body
        raise BadRequest(
            "images.data",
            f"images.data holds {len(data)} base64 characters; shape {shape} needs {expected} bytes "
            f"({4 * ((expected + 2) // 3)} characters)",
            status=400,
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise BadRequest("images.data", f"images.data is not valid base64 ({_safe(str(exc))})", 400) from None
    if len(raw) != expected:
        raise BadRequest(
            "images.data",
            f"images.data holds {len(raw)} bytes; shape {shape} needs {expected} (float32)",
            400,
        )
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32))


def parse_score_request(body: object, max_images: int, max_side: int) -> tuple[str, Tensor, list[str]]:
    """A parsed JSON body -> (reward, images, prompts), or BadRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest(
            "body", f"the body must be a JSON object {{reward, prompts, images}}, got {_show(body)}"
        )
    extra = sorted(set(body) - {"reward", "prompts", "images"})
    if extra:
        raise BadRequest("body", f"unknown keys {_show(extra)}; allowed: reward, prompts, images")
    for key in ("reward", "prompts", "images"):
        if key not in body:
            raise BadRequest(key, f"{key} is missing")
    reward = body["reward"]
    if not isinstance(reward, str):
        raise BadRequest("reward", f"reward={_show(reward)} must be a string (GET /rewards lists them)")
    prompts = body["prompts"]
    if not isinstance(prompts, list):
        raise BadRequest("prompts", f"prompts={_show(prompts)} must be a list of strings, one per image")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BadRequest(f"prompts.{i}", f"prompts[{i}]={_show(p)} must be a string")
        if len(p) > MAX_PROMPT_CHARS:
            raise BadRequest(
                f"prompts.{i}", f"prompts[{i}] has {len(p)} characters; at most {MAX_PROMPT_CHARS}"
            )
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(
                f"prompts.{i}",
                f"prompts[{i}]={_show(p)} holds a lone UTF-16 surrogate at position {exc.start}; "
                "send valid Unicode text",
            ) from None
    images = decode_images(body["images"], max_images, max_side)
    if len(prompts) != images.shape[0]:
        raise BadRequest(
            "prompts",
            f"prompts has {len(prompts)} strings for {images.shape[0]} images; send one per image",
            400,
        )
    return reward, images, prompts


def _finite_or_none(values: Tensor) -> list[float | None]:
    """JSON-safe scores: a non-finite value becomes null (JSON has no NaN); the client reports it."""
    return [v if math.isfinite(v) else None for v in values.double().tolist()]


@serve.deployment(
    name="RewardServer",
    max_ongoing_requests=64,
    max_queued_requests=64,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(api)
class RewardServer:
    """Serves ``args.rewards`` (names) built with the options of ``args.reward_config``."""

    def __init__(
        self, args: dict[str, Any] | list[str] | None = None, reward_config: dict | None = None
    ) -> None:
        if isinstance(args, list):  # RewardServer.bind(rewards, reward_config), as jobs/bench/rewards.py does
            args = {"rewards": args, "reward_config": reward_config or {}}
        self.args = RewardServiceArgs.model_validate(args or {})
        unknown = [r for r in self.args.rewards if r not in IMAGE_REWARDS]
        if unknown:
            raise RewardError(
                f"rewards={self.args.rewards!r}: give a non-empty list of {', '.join(IMAGE_REWARDS)}"
            )
        _LIMITS["max_body_bytes"] = self.args.max_body_bytes
        cfg = RewardConfig.model_validate({**self.args.reward_config, "service": None})
        self.rewards = {name: build_named(name, cfg) for name in self.args.rewards}
        self.settings = RewardServiceSettings()
        self.pending = 0  # HTTP score requests in this replica (admitted, not yet answered)
        self.batch_sizes: Counter[int] = Counter()  # requests per @serve.batch call -> count
        self.rejected = 0  # HTTP requests answered 503 by the admission check
        logger.info("reward server up with %s", ", ".join(self.rewards))

    async def reconfigure(self, user_config: dict) -> None:
        """user_config: RewardServiceSettings fields; applied without a restart."""
        self.settings = RewardServiceSettings.model_validate(user_config or {})
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def served_rewards(self) -> list[str]:
        return list(self.rewards)

    def stats(self) -> dict[str, Any]:
        """How requests were batched so far: {"batch_sizes": {requests_per_batch: count}, "rejected": n}."""
        return {"batch_sizes": dict(self.batch_sizes), "rejected": self.rejected}

    async def score(self, reward: str, images: Tensor, prompts: list[str]) -> dict[str, Any]:
        """images: (B, 3, H, W) float in [0, 1] -> {"scores": (B,) float32, "info": {name: (B,)}}."""
        if reward not in self.rewards:
            raise RewardError(f"reward={_show(reward)} is not served here; served: {', '.join(self.rewards)}")
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
    async def http_score(self, request: Request) -> JSONResponse:
        """POST /score: admission (503 + Retry-After when full), parsing, validation, scoring."""
        limit = self.settings.max_pending_requests
        if self.pending >= limit:
            self.rejected += 1
            ra = self.settings.retry_after_s
            return _error(
                503,
                f"the reward service is busy: this replica holds its limit of {limit} requests "
                f"(max_pending_requests); retry after {ra} s",
                code="overloaded",
                headers={"Retry-After": str(ra)},
            )
        self.pending += 1
        try:
            return await self._score_request(request)
        finally:
            self.pending -= 1

    async def _score_request(self, request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or nested too deep
            return _error(
                400, f"the request body is not valid JSON ({exc})", param="body", code="json_invalid"
            )
        try:
            reward, images, prompts = parse_score_request(
                body, self.args.max_images, self.args.max_image_side
            )
            out = await self.score(reward, images, prompts)
        except BadRequest as exc:
            code = "validation_error" if exc.status == 422 else "invalid_request"
            return _error(exc.status, str(exc), param=exc.field, code=code)
        except RewardError as exc:  # unknown reward, pixels outside [0, 1] or not finite
            return _error(400, str(exc), code="invalid_request")
        scores = _finite_or_none(out["scores"])
        bad = [i for i, s in enumerate(scores) if s is None]
        if bad:
            logger.warning(
                "reward %s returned non-finite scores for images %s of %d", reward, bad, len(scores)
            )
        return JSONResponse(
            {
                "reward": reward,
                "scores": scores,
                "info": {k: _finite_or_none(v) for k, v in out["info"].items()},
            }
        )


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for ``import_path: serve.rewards_app:build_app``.

    args: RewardServiceArgs fields: {"rewards": [names] or "a,b", "reward_config": {RewardConfig fields:
    device, batch_size, aesthetic: {...}, ...}, "max_body_bytes", "max_images", "max_image_side"}.
    """
    args = dict(args or {})
    if isinstance(args.get("rewards"), str):
        args["rewards"] = [r.strip() for r in args["rewards"].split(",") if r.strip()]
    try:
        parsed = RewardServiceArgs.model_validate(args)
    except ValidationError as exc:
        raise RewardError(f"serve/rewards.yaml args: {exc}") from None
    unknown = [r for r in parsed.rewards if r not in IMAGE_REWARDS]
    if unknown:
        raise RewardError(f"args.rewards has unknown rewards {unknown}; allowed: {', '.join(IMAGE_REWARDS)}")
    return RewardServer.bind(parsed.model_dump())
