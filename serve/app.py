"""The image service: a FastAPI ingress deployment and a model deployment, on Ray Serve.

    serve run serve/config.yaml          # or: serve deploy serve/config.yaml on a running cluster

Ingress (``Ingress``): routes, validation, auth, the body limit, metrics, the model-id catalog (read from
disk on every call). It resolves the request's model id (a run name follows the run's latest checkpoint) and
routes to the model deployment with ``handle.options(multiplexed_model_id=...)``.

Model (``ImageModel``): the base model plus an LRU of checkpoints per replica
(``scoreaction.serving.model_cache.ModelCache``: a model is pinned while a request uses it, so it is never
evicted under it; ``@serve.multiplexed`` only tells Serve's router which replica holds which model), the cost
limits (422), batching of compatible requests (``@serve.batch``; requests with the same size, steps, guidance
and eta share network calls), generation in a worker thread so the replica keeps answering while it computes.

Overload: each deployment has ``max_ongoing_requests`` and ``max_queued_requests``. When the model queue is
full the ingress answers 503 with Retry-After; when the ingress queue is full Serve's proxy does (its
``backpressure_config``). A generation past ``request_timeout_s`` answers 504 and is cancelled: the ingress
cancels the model call, which sets the request's ``CancelToken``, and the generation thread stops within one
denoising step (the token also carries the deadline itself). A client that disconnects cancels the same way.

No answer is a 500: every error a request can cause maps to a 4xx, transient trouble to 503/504, and
``GuardMiddleware`` turns anything unexpected into a 503 (logged).
"""

import asyncio
import base64
import logging
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from scoreaction.serving.api import (
    GenerateRequest,
    GenerateResponse,
    ModelList,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)
from scoreaction.serving.catalog import CheckpointCatalog
from serve.feedback import FeedbackService, feedback_router
from serve.metrics import IngressMetrics, ModelMetrics
from serve.settings import ModelArgs, ServeSettings
from serve.web import (
    GuardMiddleware,
    SafeJSONResponse,
    error_response,
    exception_response,
    http_error_handler,
    prefers_png,
    validation_error_handler,
)

logger = logging.getLogger(__name__)

app = FastAPI(
    title="scoreaction image service",
    description="Images from the base model or any fine-tuned checkpoint; OpenAI Images API compatible subset.",
    version="1",
    default_response_class=SafeJSONResponse,
)
app.add_exception_handler(RequestValidationError, validation_error_handler)
app.add_exception_handler(StarletteHTTPException, http_error_handler)
_METRICS: list[IngressMetrics] = []  # set by the ingress replica; read by the guard middleware


async def _result(response):
    """A DeploymentResponse as a coroutine (for asyncio.wait_for)."""
    return await response


app.add_middleware(GuardMiddleware, observe=lambda: _METRICS[0].observe if _METRICS else None)
_FEEDBACK: list[FeedbackService] = []  # set by the ingress replica; the feedback routes use it
app.include_router(feedback_router(lambda: _FEEDBACK[0]))  # /playground, /v1/preferences (serve/feedback.py)


# --------------------------------------------------------------------------------------------------
# Model deployment
# --------------------------------------------------------------------------------------------------


@serve.deployment(
    name="ImageModel",
    max_ongoing_requests=8,
    max_queued_requests=16,
    ray_actor_options={"num_cpus": 1},
)
class ImageModel:
    """Base model + LRU of checkpoints (pinned while in use); cost limits; batched, deterministic,
    cancellable generation."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        import torch

        from scoreaction.serving.generate import ImageGenerator
        from scoreaction.serving.model_cache import ModelCache

        self.args = ModelArgs.model_validate(args or {})
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        self.settings = ServeSettings()
        self.generator = ImageGenerator.from_config(self.args.base_model, chunk=self.args.chunk)
        self.cache = ModelCache(self.generator.load, self.args.max_loaded_models)

        async def route(key: str) -> str:  # a plain function: Serve stores its LRU on the decorated object
            return key  # only so the router sends a model's requests to the replica holding it

        self._route = serve.multiplexed(max_num_models_per_replica=self.args.max_loaded_models)(route)
        self.metrics = ModelMetrics()
        logger.info("ImageModel ready: base %s, chunk %d", self.generator.policy.base_model, self.args.chunk)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.settings = ServeSettings.model_validate(user_config or {})
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    async def generate(self, job: dict[str, Any]) -> dict[str, Any] | Exception:
        """job: GenerationSpec fields + 'path' (checkpoint folder or None), 'model' (concrete id) and
        'timeout_s' (the request's deadline from now). An error with an HTTP status (a limit, a broken
        checkpoint, busy slots, a timeout) is returned, not raised: it is an answer, not a replica failure."""
        from scoreaction.serving.spec import CancelToken, GenerationSpec

        arrived = time.perf_counter()
        key = serve.get_multiplexed_model_id()
        spec = GenerationSpec(**{k: v for k, v in job.items() if k not in ("path", "model", "timeout_s")})
        token = CancelToken(job.get("timeout_s"))
        try:
            self.generator.check(spec, self.settings.limits())  # size or cost refused: 422 before queueing
            await self._route(key)
            remaining = token.remaining()
            wait_s = (
                self.settings.model_wait_s
                if remaining is None
                else min(self.settings.model_wait_s, remaining)
            )
            async with self.cache.use(key, job["path"], job["model"], wait_s) as model:
                try:
                    out = await self._batched((spec, model, token, arrived, job["model"]))
                except BaseException:  # cancelled (timeout, client gone) or failed: stop the compute
                    token.cancel()
                    raise
        except Exception as exc:
            if isinstance(getattr(type(exc), "status_code", None), int):
                return exc
            raise
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple]) -> list[dict[str, Any] | BaseException]:
        from scoreaction.serving.spec import GenerationCancelled

        start = time.perf_counter()
        groups: dict[tuple, list[int]] = {}
        results: list[dict[str, Any] | BaseException | None] = [None] * len(items)
        for i, (spec, model, token, _, _) in enumerate(items):
            if token.cancelled:  # given up while queued: never computed
                results[i] = GenerationCancelled(f"the request was cancelled before it ran ({token.reason})")
                continue
            groups.setdefault((id(model), spec.batch_key()), []).append(i)
        self.metrics.batch(len(items))
        for idx in groups.values():
            model = items[idx[0]][1]
            specs = [items[i][0] for i in idx]
            tokens = [items[i][2] for i in idx]
            t0 = time.perf_counter()
            try:
                pngs = await asyncio.to_thread(self.generator.generate, model, specs, tokens)
            except GenerationCancelled as exc:
                self.metrics.cancelled(len(idx))
                for i in idx:
                    results[i] = exc
                continue
            ms = (time.perf_counter() - t0) * 1000
            c, h, w = self.generator.check(specs[0])
            f = self.generator.policy.vae_scale_factor
            for i, images in zip(idx, pngs, strict=True):
                spec, _, token, arrived, model_id = items[i]
                if images is None:
                    self.metrics.cancelled(1)
                    results[i] = GenerationCancelled(f"the request was cancelled ({token.reason})")
                    continue
                self.metrics.images(model_id, len(images))
                results[i] = {
                    "images": images,
                    "model": model_id,
                    "seed": spec.seed,
                    "height": h * f,
                    "width": w * f,
                    "queue_ms": (start - arrived) * 1000,
                    "generate_ms": ms,
                    "batch_size": len(idx),
                }
        return results

    async def default_size(self) -> int:
        return self.generator.default_size

    async def loaded_models(self) -> list[str]:
        """Keys of the models this replica holds (LRU order): for tests and debugging."""
        return self.cache.keys()


# --------------------------------------------------------------------------------------------------
# Ingress deployment
# --------------------------------------------------------------------------------------------------


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=64,
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    ray_actor_options={"num_cpus": 0.5},
)
@serve.ingress(app)
class Ingress:
    def __init__(self, model: DeploymentHandle) -> None:
        self.model = model
        self.settings = ServeSettings()
        self.catalog = CheckpointCatalog(self.settings.root())
        if not _METRICS:
            _METRICS.append(IngressMetrics())
        self._set_feedback()

    def _set_feedback(self) -> None:
        """The preference store of this replica; reopened only when its database URL changed."""
        fb = self.settings.feedback
        current = _FEEDBACK[0] if _FEEDBACK else None
        if current is not None and current.database_url == fb.database_url:
            current.catalog, current.cache_images = self.catalog, fb.cache_images
            return
        if current is not None:
            current.close()
        _FEEDBACK[:] = [FeedbackService(fb.database_url, self.catalog, self._run, fb.cache_images)]

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot reload (serve deploy with a changed user_config): default model, root, timeouts."""
        self.settings = ServeSettings.model_validate(user_config or {})
        self.catalog = CheckpointCatalog(self.settings.root())
        self._set_feedback()
        logger.info(
            "settings: default_model=%s checkpoint_root=%s", self.settings.default_model, self.catalog.root
        )

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness of the ingress (no auth). Never waits on the model deployment."""
        return {"status": "ok", "default_model": self.settings.default_model}

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> dict[str, Any]:
        """The base model and every checkpoint under the checkpoint root, with step and reward."""
        data = await asyncio.to_thread(self.catalog.list_models)
        return {"object": "list", "default": self.settings.default_model, "data": data}

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={
            200: {"content": {"image/png": {}}, "description": "JSON, or the PNG (Accept: image/png, n=1)"}
        },
    )
    async def generate(self, body: GenerateRequest, request: Request):
        """Native generation. JSON with base64 PNGs, the seed and timings; with ``Accept: image/png`` and n=1
        the PNG itself (seed in the X-Seed header)."""
        png = prefers_png(request.headers.get("accept"))
        if png and body.n != 1:
            message = f"n={body.n}: Accept: image/png returns one image; use n=1 or Accept: application/json"
            return error_response(406, message, param="n")
        start = time.perf_counter()
        out = await self._run(body)
        if isinstance(out, Response):
            return out
        _FEEDBACK[0].remember(body, out)  # the image a following POST /v1/preferences may compare
        total = (time.perf_counter() - start) * 1000
        if png:
            headers = {"X-Seed": str(out["seed"]), "X-Model": out["model"], "X-Total-Ms": f"{total:.1f}"}
            return Response(out["images"][0], media_type="image/png", headers=headers)
        return {
            "model": out["model"],
            "seed": out["seed"],
            "width": out["width"],
            "height": out["height"],
            "images": [{"b64_png": base64.b64encode(b).decode()} for b in out["images"]],
            "timings": {
                "queue_ms": out["queue_ms"],
                "generate_ms": out["generate_ms"],
                "total_ms": total,
                "batch_size": out["batch_size"],
            },
        }

    @app.post("/v1/images/generations", response_model=OpenAIImagesResponse)
    async def openai_images(self, body: OpenAIImageRequest):
        """OpenAI Images API subset (``client.images.generate(..., response_format="b64_json")``)."""
        defaults = GenerateRequest.model_fields
        native = body.to_native(defaults["num_inference_steps"].default, defaults["guidance_scale"].default)
        out = await self._run(native)
        if isinstance(out, Response):
            return out
        return {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(b).decode()} for b in out["images"]],
        }

    async def _run(self, body: GenerateRequest) -> dict[str, Any] | Response:
        """Resolve the model, call the model deployment, map failures to statuses (never a 500)."""
        settings = self.settings
        retry = {"Retry-After": str(settings.retry_after_s)}
        model_id = body.model or settings.default_model
        try:
            resolved = await asyncio.to_thread(self.catalog.resolve, model_id)
        except Exception as exc:  # 400 bad id, 404 unknown, 422 unusable, 503 being written
            answer = exception_response(exc, settings.retry_after_s)
            if answer is None:
                raise
            return answer
        job = body.model_dump(exclude={"model"})
        job["seed"] = body.seed if body.seed is not None else secrets.randbelow(2**32)
        timeout = settings.request_timeout_s
        job.update(path=resolved.path, model=resolved.id, timeout_s=timeout)
        handle = self.model.options(multiplexed_model_id=resolved.key)
        response = handle.generate.remote(job)
        try:
            out = await asyncio.wait_for(_result(response), timeout=timeout)
            if isinstance(out, Exception):  # a limit, a broken checkpoint, busy slots, a timeout
                return exception_response(out, settings.retry_after_s) or error_response(
                    503,
                    f"generation failed: {out}",
                    code="generation_failed",
                    type_="server_error",
                    headers=retry,
                )
            return out
        except TimeoutError:
            response.cancel()  # the model replica's CancelToken stops the compute within one step
            message = (
                f"generation took longer than request_timeout_s={timeout:g}s and was cancelled; retry later "
                "or ask for fewer steps, images or pixels"
            )
            return error_response(504, message, code="timeout", headers=retry)
        except asyncio.CancelledError:  # the client went away: stop the compute too
            response.cancel()
            raise
        except BackPressureError as exc:
            ra = exc.retry_after_s
            headers = {"Retry-After": str(int(ra) if ra is not None else settings.retry_after_s)}
            return error_response(
                503, f"overloaded, retry later: {exc.message}", code="overloaded", headers=headers
            )
        except DeploymentUnavailableError as exc:
            return error_response(503, f"model unavailable: {exc}", code="unavailable", headers=retry)
        except Exception as exc:
            answer = exception_response(exc, settings.retry_after_s)
            if answer is not None:
                return answer
            cause = getattr(exc, "cause", None) or exc
            logger.error("generation failed: %s", exc)
            first_line = (str(cause).strip().splitlines() or [""])[0][:300]
            message = f"generation failed: {type(cause).__name__}: {first_line}; retry later"
            return error_response(503, message, code="generation_failed", type_="server_error", headers=retry)


# --------------------------------------------------------------------------------------------------
# Application builder (serve/config.yaml: import_path serve.app:build_app)
# --------------------------------------------------------------------------------------------------


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """args: ModelArgs fields (base_model, max_loaded_models, chunk, torch_threads)."""
    model_args = ModelArgs.model_validate(args or {})
    return Ingress.bind(ImageModel.bind(model_args.model_dump()))
