"""The image service's rating routes on one machine without Ray: the same /v1/models, /v1/generate (JSON),
/v1/preferences and /playground, the same guard (API key, body limit) and error shape, generation in-process.

    python -m serve.feedback_local --preset digits --port 8000 [--checkpoint-root outputs] [--database-url URL]

For rating on a laptop and for tests (it is what the playground's browser test and the end-to-end test drive).
The Ray Serve application (serve/app.py) is the production path: batching, an LRU of models per replica,
deadlines and backpressure. Here one lock serialises generations and every loaded checkpoint stays loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from scoreaction.serving.api import GenerateRequest
from scoreaction.serving.catalog import CheckpointCatalog
from serve.feedback import FeedbackService, feedback_router
from serve.settings import PROJECT_ROOT, ServeSettings
from serve.web import (
    GuardMiddleware,
    SafeJSONResponse,
    error_response,
    exception_response,
    http_error_handler,
    validation_error_handler,
)

logger = logging.getLogger(__name__)


class LocalImages:
    """In-process generation with the model replica's checks: resolve, load once, check limits, generate."""

    def __init__(self, generator, catalog: CheckpointCatalog, settings: ServeSettings) -> None:
        self.generator = generator
        self.catalog = catalog
        self.settings = settings
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _generate(self, body: GenerateRequest) -> dict[str, Any]:
        from scoreaction.serving.spec import GenerationSpec

        resolved = self.catalog.resolve(body.model or self.settings.default_model)
        job = body.model_dump(exclude={"model"})
        job["seed"] = body.seed if body.seed is not None else secrets.randbelow(2**32)
        spec = GenerationSpec(**job)
        c, h, w = self.generator.check(spec, self.settings.limits())
        with self._lock:
            model = self._models.get(resolved.key)
            if model is None:
                model = self._models[resolved.key] = self.generator.load(
                    resolved.key, resolved.path, resolved.id
                )
            t0 = time.perf_counter()
            images = self.generator.generate(model, [spec])[0]
        f = self.generator.policy.vae_scale_factor
        return {
            "images": images,
            "model": resolved.id,
            "seed": spec.seed,
            "height": h * f,
            "width": w * f,
            "generate_ms": (time.perf_counter() - t0) * 1000,
        }

    async def __call__(self, body: GenerateRequest) -> dict[str, Any] | Response:
        try:
            return await asyncio.to_thread(self._generate, body)
        except Exception as exc:
            answer = exception_response(exc, self.settings.retry_after_s)
            if answer is None:
                raise
            return answer


def build_local_app(
    generator, settings: ServeSettings | None = None, root: Path = PROJECT_ROOT
) -> tuple[FastAPI, FeedbackService]:
    """A FastAPI app serving generator's base model and the runs under settings.checkpoint_root."""
    settings = settings or ServeSettings()
    catalog = CheckpointCatalog(settings.root())
    images = LocalImages(generator, catalog, settings)
    feedback = FeedbackService(
        settings.feedback.database_url, catalog, images, settings.feedback.cache_images, root=root
    )
    app = FastAPI(title="scoreaction rating (local)", default_response_class=SafeJSONResponse)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_middleware(GuardMiddleware)
    app.include_router(feedback_router(lambda: feedback))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "default_model": settings.default_model}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = await asyncio.to_thread(catalog.list_models)
        return {"object": "list", "default": settings.default_model, "data": data}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest):
        if body.n != 1:
            return error_response(422, f"n={body.n}: the local service draws one image a call", param="n")
        out = await images(body)
        if isinstance(out, Response):
            return out
        feedback.remember(body, out)
        return {
            "model": out["model"],
            "seed": out["seed"],
            "width": out["width"],
            "height": out["height"],
            "images": [{"b64_png": base64.b64encode(b).decode()} for b in out["images"]],
            "timings": {"generate_ms": out["generate_ms"]},
        }

    return app, feedback


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from scoreaction.config import ModelConfig
    from scoreaction.serving.generate import ImageGenerator

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits", help="base model preset (digits, tiny, sd15, ...)")
    p.add_argument("--name-or-path", default=None, help="base model folder or hub id (default: the preset's)")
    p.add_argument("--checkpoint-root", default="outputs", help="folder of fine-tuning runs")
    p.add_argument("--database-url", default="sqlite:///outputs/feedback.db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    settings = ServeSettings.model_validate(
        {"checkpoint_root": args.checkpoint_root, "feedback": {"database_url": args.database_url}}
    )
    model = ModelConfig(preset=args.preset, name_or_path=args.name_or_path)
    app, _ = build_local_app(ImageGenerator.from_config(model), settings)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
