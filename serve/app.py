"""The image service: a FastAPI ingress deployment and a model deployment, on Ray Serve.

    serve run serve/config.yaml          # or: serve deploy serve/config.yaml on a running cluster

Ingress (``Ingress``): routes, validation, auth, the body limit, metrics, the model-id catalog (read from
disk on every call). It resolves the request's model id (a run name follows the run's latest checkpoint) and
routes to the model deployment with ``handle.options(multiplexed_model_id=...)``.

Model (``ImageModel``): the base model plus an LRU of checkpoints per replica (``@serve.multiplexed``),
batching of compatible requests (``@serve.batch``; requests with the same size, steps, guidance and eta share
network calls), generation in a worker thread so the replica keeps answering while it computes.

Overload: each deployment has ``max_ongoing_requests`` and ``max_queued_requests``. When the model queue is
full the ingress answers 503 with Retry-After; when the ingress queue is full Serve's proxy does (its
``backpressure_config``). A generation past ``request_timeout_s`` answers 504 and is cancelled.
"""

import asyncio
import base64
import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from scoreaction.catalog import CheckpointCatalog, ModelIdError, UnknownModelError
from scoreaction.serve_api import (
    GenerateRequest,
    GenerateResponse,
    ModelList,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)
from serve.metrics import IngressMetrics, ModelMetrics
from serve.settings import ModelArgs, ServeSettings
from serve.web import (
    GuardMiddleware,
    error_response,
    exception_status,
    http_error_handler,
    prefers_png,
    validation_error_handler,
)

logger = logging.getLogger(__name__)

app = FastAPI(
    title="scoreaction image service",
    description="Images from the base model or any fine-tuned checkpoint; OpenAI Images API compatible subset.",
    version="1",
)
app.add_exception_handler(RequestValidationError, validation_error_handler)
app.add_exception_handler(StarletteHTTPException, http_error_handler)
_METRICS: list[IngressMetrics] = []  # set by the ingress replica; read by the guard middleware


async def _result(response):
    """A DeploymentResponse as a coroutine (for asyncio.wait_for)."""
    return await response


app.add_middleware(GuardMiddleware, observe=lambda: _METRICS[0].observe if _METRICS else None)


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
    """Base model + LRU of checkpoints; batched, deterministic generation."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        import torch

        from scoreaction.generate import ImageGenerator

        self.args = ModelArgs.model_validate(args or {})
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        self.generator = ImageGenerator.from_config(self.args.base_model, chunk=self.args.chunk)
        self._paths: OrderedDict[str, str | None] = OrderedDict()

        async def load(key: str):  # a plain function: Serve stores its LRU on the decorated object
            return await asyncio.to_thread(self.generator.load, key, self._paths.get(key))

        self.get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_loaded_models)(load)
        self.metrics = ModelMetrics()
        logger.info("ImageModel ready: base %s, chunk %d", self.generator.policy.base_model, self.args.chunk)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = ServeSettings.model_validate(user_config or {})
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        """job: GenerationSpec fields + 'path' (checkpoint folder or None) + 'model' (concrete id)."""
        from scoreaction.generate import GenerationSpec

        key = serve.get_multiplexed_model_id()
        self._paths[key] = job["path"]
        self._paths.move_to_end(key)
        while len(self._paths) > 1024:
            self._paths.popitem(last=False)
        model = await self.get_model(key)
        spec = GenerationSpec(**{k: v for k, v in job.items() if k not in ("path", "model")})
        self.generator.check(spec)  # size this model cannot take: 422 before queueing
        return await self._batched((spec, model, time.perf_counter(), job["model"]))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        groups: dict[tuple, list[int]] = {}
        for i, (spec, model, _, _) in enumerate(items):
            groups.setdefault((id(model), spec.batch_key()), []).append(i)
        results: list[dict[str, Any] | None] = [None] * len(items)
        self.metrics.batch(len(items))
        for idx in groups.values():
            model = items[idx[0]][1]
            specs = [items[i][0] for i in idx]
            t0 = time.perf_counter()
            pngs = await asyncio.to_thread(self.generator.generate, model, specs)
            ms = (time.perf_counter() - t0) * 1000
            c, h, w = self.generator.check(specs[0])
            f = self.generator.policy.vae_scale_factor
            for i, images in zip(idx, pngs, strict=True):
                spec, _, arrived, model_id = items[i]
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

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot reload (serve deploy with a changed user_config): default model, root, timeouts."""
        self.settings = ServeSettings.model_validate(user_config or {})
        self.catalog = CheckpointCatalog(self.settings.root())
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
        """Resolve the model, call the model deployment, map failures to statuses."""
        model_id = body.model or self.settings.default_model
        try:
            resolved = await asyncio.to_thread(self.catalog.resolve, model_id)
        except (ModelIdError, UnknownModelError) as exc:
            code = "model_not_found" if exc.status_code == 404 else "invalid_model_id"
            message = exc.args[0] if exc.args else str(exc)
            return error_response(exc.status_code, message, param="model", code=code)
        job = body.model_dump(exclude={"model"})
        job["seed"] = body.seed if body.seed is not None else secrets.randbelow(2**32)
        job.update(path=resolved.path, model=resolved.id)
        handle = self.model.options(multiplexed_model_id=resolved.key)
        response = handle.generate.remote(job)
        timeout = self.settings.request_timeout_s
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        try:
            return await asyncio.wait_for(_result(response), timeout=timeout)
        except TimeoutError:
            response.cancel()
            message = (
                f"generation took longer than request_timeout_s={timeout}s and was cancelled; retry later "
                "or ask for fewer steps, images or pixels"
            )
            return error_response(504, message, code="timeout", headers=retry)
        except BackPressureError as exc:
            ra = exc.retry_after_s
            headers = {"Retry-After": str(int(ra) if ra is not None else self.settings.retry_after_s)}
            return error_response(
                503, f"overloaded, retry later: {exc.message}", code="overloaded", headers=headers
            )
        except DeploymentUnavailableError as exc:
            return error_response(503, f"model unavailable: {exc}", code="unavailable", headers=retry)
        except Exception as exc:
            status = exception_status(exc)
            cause = getattr(exc, "cause", None) or exc
            first_line = (str(cause).strip().splitlines() or [""])[0]
            if status is not None and status < 500:
                return error_response(status, first_line, code="invalid_request")
            logger.exception("generation failed")
            message = f"generation failed: {type(cause).__name__}: {first_line}"  # e.g. a broken checkpoint
            return error_response(500, message, code="internal_error")


# --------------------------------------------------------------------------------------------------
# Application builder (serve/config.yaml: import_path serve.app:build_app)
# --------------------------------------------------------------------------------------------------


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """args: ModelArgs fields (base_model, max_loaded_models, chunk, torch_threads)."""
    model_args = ModelArgs.model_validate(args or {})
    return Ingress.bind(ImageModel.bind(model_args.model_dump()))
