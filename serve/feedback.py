"""Human feedback routes of the image service, free of Ray: the playground page and the preferences API.

    GET  /playground        the rating page (HTML, CSS and JS from serve/playground/, inlined; no CDN)
    POST /v1/preferences    store one comparison (201): prompt, two (model, seed) sides, the generation
                            parameters, the choice (a | b | tie | both_bad), an optional rater id
    GET  /v1/preferences    export as JSON lines (application/x-ndjson), oldest first, ``after``/``limit``
                            paging (``X-Next-After`` names the next page's cursor), ``images=true`` adds
                            the PNGs as base64; ``X-Total-Count`` is the number of stored comparisons

The images a comparison stores are the service's own: the client sends models, seeds and parameters, never
pixels. ``POST /v1/preferences`` takes them from a small cache that ``/v1/generate`` fills (the images the
rater was just shown), and regenerates on a miss (generation is deterministic for a seed, the parameters,
the checkpoint and the replica's ``chunk``), so what is stored is exactly what the service shows for those
settings, and a stored comparison never depends on a checkpoint still existing.

``FeedbackService`` holds the store (opened on first use), the image cache and the service's generation
call; ``feedback_router`` builds the routes around a function returning it, so the Ray ingress
(serve/app.py) and a plain FastAPI app in tests serve the same code.
"""

# No `from __future__ import annotations`: Serve pickles the routes by value, and FastAPI must find the
# request models as objects, not as names to look up in globals the pickle did not carry.

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field, field_validator

from scoreaction.serving.api import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    GenerateRequest,
    check_size,
)
from scoreaction.serving.api import _Strict as Strict
from scoreaction.serving.catalog import CheckpointCatalog
from scoreaction.serving.feedback_store import CHOICES, FeedbackStore, FeedbackStoreError, export_row
from serve.settings import PROJECT_ROOT
from serve.web import error_response, exception_response

logger = logging.getLogger(__name__)

PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"
MAX_PAGE = 1000
Generate = Callable[[GenerateRequest], Awaitable[dict[str, Any] | Response]]


class PreferenceSide(Strict):
    """One of the two images: which model drew it, from which seed."""

    model: str = Field(min_length=1, max_length=200, description="Model id (GET /v1/models).")
    seed: int = Field(ge=0, le=MAX_SEED, description="Seed of the image's noise.")


class PreferenceRequest(Strict):
    """One comparison: both images share the prompt and the generation parameters."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    a: PreferenceSide
    b: PreferenceSide
    choice: Literal["a", "b", "tie", "both_bad"] = Field(
        description="a or b: that image is better; tie: equally good; both_bad: neither is acceptable."
    )
    rater: str | None = Field(
        None,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.@+-]+$",
        description="Optional rater id: letters, digits and _ . @ + -.",
    )
    num_inference_steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    eta: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    height: int | None = None
    width: int | None = None

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int | None, info) -> int | None:
        return check_size(info.field_name, v)

    def generate_request(self, side: Literal["a", "b"]) -> GenerateRequest:
        s = getattr(self, side)
        return GenerateRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            eta=self.eta,
            seed=s.seed,
            height=self.height,
            width=self.width,
            n=1,
            model=s.model,
        )


class PreferenceStored(BaseModel):
    id: int
    count: int = Field(description="Comparisons stored now, this one included.")
    a: dict[str, Any]
    b: dict[str, Any]


def _cache_key(model_id: str, body: GenerateRequest) -> tuple:
    return (
        model_id,
        body.prompt,
        body.negative_prompt,
        body.seed,
        body.num_inference_steps,
        body.guidance_scale,
        body.eta,
        body.height,
        body.width,
    )


class FeedbackService:
    """The preference store of one ingress replica, its cache of recently shown images and the generation
    call used on a cache miss (``generate(GenerateRequest) -> {"images", "model", "height", "width", ...}`` or
    an error Response)."""

    def __init__(
        self,
        database_url: str,
        catalog: CheckpointCatalog,
        generate: Generate,
        cache_images: int = 64,
        root: Path = PROJECT_ROOT,
    ) -> None:
        self.database_url = database_url
        self.catalog = catalog
        self.generate = generate
        self.cache_images = cache_images
        self.root = root
        self._store: FeedbackStore | None = None
        self._open_lock = threading.Lock()
        self._cache: OrderedDict[tuple, tuple[bytes, int, int]] = OrderedDict()

    def store(self) -> FeedbackStore:
        """The store, opened on first use (FeedbackStoreError, a 503, when the database is unreachable)."""
        with self._open_lock:
            if self._store is None:
                self._store = FeedbackStore(self.database_url, self.root)
            return self._store

    def close(self) -> None:
        with self._open_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def remember(self, body: GenerateRequest, out: dict[str, Any]) -> None:
        """Keep the image of a one-image generation for the preference that may follow."""
        if body.n != 1 or self.cache_images <= 0:
            return
        req = body.model_copy(update={"seed": out["seed"]})
        key = _cache_key(out["model"], req)
        self._cache[key] = (out["images"][0], int(out["height"]), int(out["width"]))
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_images:
            self._cache.popitem(last=False)

    async def _image(self, body: GenerateRequest) -> tuple[str, bytes, int, int] | Response:
        """(concrete model id, PNG, height, width) of one side, from the cache or generated now."""
        try:
            resolved = await asyncio.to_thread(self.catalog.resolve, body.model or "base")
        except Exception as exc:  # 400 bad id, 404 unknown, 422 unusable, 503 being written
            answer = exception_response(exc, 1)
            if answer is None:
                raise
            return answer
        hit = self._cache.get(_cache_key(resolved.id, body))
        if hit is not None:
            return (resolved.id, *hit)
        out = await self.generate(body.model_copy(update={"model": resolved.id}))
        if isinstance(out, Response):
            return out
        self.remember(body.model_copy(update={"model": resolved.id}), out)
        return out["model"], out["images"][0], int(out["height"]), int(out["width"])

    async def add(self, body: PreferenceRequest) -> dict[str, Any] | Response:
        sides = await asyncio.gather(
            self._image(body.generate_request("a")), self._image(body.generate_request("b"))
        )
        for side, got in zip(("a", "b"), sides, strict=True):
            if isinstance(got, Response):  # name the side in the error's param
                return _with_side(got, side)
        (ckpt_a, png_a, h, w), (ckpt_b, png_b, _, _) = sides
        row = dict(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            model_a=body.a.model,
            model_b=body.b.model,
            checkpoint_a=ckpt_a,
            checkpoint_b=ckpt_b,
            seed_a=body.a.seed,
            seed_b=body.b.seed,
            image_a=png_a,
            image_b=png_b,
            choice=body.choice,
            rater=body.rater,
            height=h,
            width=w,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            eta=body.eta,
        )

        def write() -> tuple[int, int, dict[str, Any]]:
            store = self.store()
            new_id = store.add(**row)
            stored = store.get(new_id)
            return new_id, store.count(), export_row(stored or {}) if stored else {}

        try:
            new_id, count, exported = await asyncio.to_thread(write)
        except FeedbackStoreError as exc:
            logger.error("%s", exc)
            return exception_response(exc, 1) or error_response(503, str(exc))
        return {"id": new_id, "count": count, "a": exported.get("a", {}), "b": exported.get("b", {})}

    async def export(self, after: int, limit: int, images: bool) -> Response:
        def read() -> tuple[list[dict[str, Any]], int]:
            store = self.store()
            return store.page(after, limit), store.count()

        try:
            rows, total = await asyncio.to_thread(read)
        except FeedbackStoreError as exc:
            logger.error("%s", exc)
            return exception_response(exc, 1) or error_response(503, str(exc))
        lines = "".join(json.dumps(export_row(r, images), separators=(",", ":")) + "\n" for r in rows)
        headers = {"X-Total-Count": str(total)}
        if rows and len(rows) == limit:
            headers["X-Next-After"] = str(rows[-1]["id"])
        return Response(lines, media_type="application/x-ndjson", headers=headers)


def _with_side(answer: Response, side: str) -> Response:
    """An error answer about one side's model with param 'a.model' / 'b.model'."""
    try:
        body = json.loads(bytes(answer.body))
        err = body["error"]
        if err.get("param") in ("model", None):
            err["param"] = f"{side}.{err.get('param') or 'model'}"
        err["message"] = f"{side}: {err['message']}"
        headers = {k: v for k, v in answer.headers.items() if k.lower() == "retry-after"}
        return error_response(
            answer.status_code,
            err["message"],
            param=err["param"],
            code=err.get("code"),
            limit=err.get("limit"),
            errors=err.get("errors"),
            type_=err.get("type"),
            headers=headers or None,
        )
    except (ValueError, KeyError, TypeError):
        return answer


def playground_page() -> str:
    """index.html with playground.css and playground.js inlined: one self-contained page."""
    html = (PLAYGROUND_DIR / "index.html").read_text(encoding="utf-8")
    css = (PLAYGROUND_DIR / "playground.css").read_text(encoding="utf-8")
    js = (PLAYGROUND_DIR / "playground.js").read_text(encoding="utf-8")
    return html.replace("/*{{CSS}}*/", css).replace("/*{{JS}}*/", js)


def feedback_router(service: Callable[[], FeedbackService]) -> APIRouter:
    """The routes, around a function returning the replica's FeedbackService."""
    router = APIRouter()

    @router.get("/playground", include_in_schema=False)
    async def playground() -> HTMLResponse:
        """The rating page (no auth: it holds no data; it asks for the API key and sends it on each call)."""
        return HTMLResponse(playground_page(), headers={"Cache-Control": "no-store"})

    @router.post(
        "/v1/preferences",
        status_code=201,
        response_model=PreferenceStored,
        summary="Store one comparison of two images",
    )
    async def add_preference(body: PreferenceRequest):
        """The service renders (or takes from its cache) both images and stores them with the choice."""
        return await service().add(body)

    @router.get(
        "/v1/preferences",
        responses={200: {"content": {"application/x-ndjson": {}}}},
        summary="Export stored comparisons as JSON lines",
    )
    async def list_preferences(
        after: int = Query(0, ge=0, le=2**62, description="Return comparisons with id > after."),
        limit: int = Query(100, ge=0, le=MAX_PAGE, description=f"At most this many (0..{MAX_PAGE})."),
        images: bool = Query(False, description="Include both PNGs as base64 (b64_png)."),
    ):
        return await service().export(after, limit, images)

    return router


__all__ = ["CHOICES", "FeedbackService", "PreferenceRequest", "feedback_router", "playground_page"]
