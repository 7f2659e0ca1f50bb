"""HTTP plumbing of the ingress, free of Ray: JSON errors, the auth / body-size / content-type guard, the
backstop for unexpected exceptions, content negotiation.

Every error answer of the ingress has one shape, the one OpenAI clients parse:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "num_inference_steps",
               "code": "validation_error",
               "errors": [{"field", "value", "message"}],            # 422 validation errors only
               "limit": {"name", "value", "allowed"}}}               # a configured limit refused it

``message``, ``type`` (invalid_request_error, authentication_error, not_found_error, overloaded_error,
timeout_error, server_error), ``param`` (the request field or header at fault, or null) and ``code`` (a
stable machine-readable name, or null) are always present. Every string in an error body is valid Unicode
(lone surrogates echoed from a request become U+FFFD), so the body always encodes.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scoreaction.serving.api import MAX_BODY_BYTES, clean_text, jsonable
from serve.settings import API_KEY_ENV

logger = logging.getLogger(__name__)

PUBLIC_PATHS = ("/healthz", "/playground")  # the page holds no data; it sends the key on each API call
ROUTES = (
    "/healthz",
    "/v1/models",
    "/v1/generate",
    "/v1/images/generations",
    "/v1/preferences",
    "/playground",
    "/docs",
    "/openapi.json",
)
JSON_TYPES = ("application/json",)  # and any application/*+json
_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def safe_json(value: Any) -> Any:
    """value with every string made encodable (lone surrogates -> U+FFFD) and non-finite floats as text."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {safe_json(str(k)): safe_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_json(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """A JSONResponse that always encodes: strings cleaned, NaN/Infinity as text (the app's default class)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            safe_json(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    limit: dict[str, Any] | None = None,
    type_: str | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "message": message,
        "type": type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param,
        "code": code,
    }
    if errors:
        body["errors"] = errors
    if limit:
        body["limit"] = limit
    return SafeJSONResponse({"error": body}, status_code=status, headers=headers)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field with its value and what is allowed; malformed JSON is a 400."""
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        detail = (e.get("ctx") or {}).get("error", "")
        pos = e["loc"][-1] if e.get("loc") else "?"
        return error_response(
            400, f"the request body is not valid JSON ({detail} at position {pos})", code="json_invalid"
        )
    items = []
    for e in errs:
        field = clean_text(_field(e.get("loc", ())))
        value = jsonable(e.get("input"))
        msg = clean_text(str(e.get("msg", "invalid")))
        if e.get("type") == "missing":
            value = None
        if e.get("type") == "string_unicode":  # pydantic's words for a lone surrogate in a value or a key
            what = "a key" if field == "body" else "the value"
            msg = (
                f"{what} holds a lone UTF-16 surrogate (e.g. \\ud800): not valid Unicode text; send UTF-8, or "
                "\\u escapes only of whole surrogate pairs"
            )
        items.append({"field": field, "value": value, "message": msg})
    first = items[0] if items else {"field": "body", "value": None, "message": "invalid"}
    text = "; ".join(f"{i['field']}={json.dumps(i['value'])}: {i['message']}" for i in items)
    return error_response(422, text, param=first["field"], code="validation_error", errors=items)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(safe_json(exc.detail))
    if exc.status_code == 400 and "parsing the body" in message:  # e.g. a body that is not UTF-8
        cause = exc.__cause__
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        message = f"the request body cannot be read as JSON{why}: send UTF-8 JSON"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; routes: {', '.join(ROUTES)}"
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))


def prefers_png(accept: str | None) -> bool:
    """True when the Accept header ranks image/png above application/json (q-values honoured)."""
    if not accept:
        return False
    q: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (x.strip() for x in part.split(";"))
        weight = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    weight = float(p[2:])
                except ValueError:
                    weight = 0.0
        q[media.lower()] = max(weight, q.get(media.lower(), 0.0))
    png = max(q.get("image/png", 0.0), q.get("image/*", 0.0) * 0.999)
    json_q = max(q.get("application/json", 0.0), q.get("application/*", 0.0), q.get("*/*", 0.0))
    return png > 0 and png > json_q


Observer = Callable[[str, str, int, float], None]  # (route, method, status, seconds)


class GuardMiddleware:
    """Pure ASGI middleware, outermost: API key, the 64 KiB body limit, the content type, metrics of every
    answer, and the backstop for unexpected exceptions.

    The key is read from $SCOREACTION_API_KEY at each request (so a replica started with it set enforces it)
    and compared in constant time. The body limit checks Content-Length first and also counts a streamed
    (chunked) body, so a client cannot get past it by omitting the header. A POST body must be JSON
    (Content-Type application/json or */*+json, or none): anything else is a 415. An exception nothing else
    turned into an answer becomes a 503 ``internal_error`` with Retry-After (logged with its traceback);
    never a 500. The routes map every error a request can cause to a 4xx themselves: this is a backstop.
    """

    def __init__(
        self,
        app,
        observe: Callable[[], Observer | None] = lambda: None,
        retry_after_s: int = 1,
        max_body_bytes: Callable[[], int] = lambda: MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.observe = observe
        self.retry_after_s = retry_after_s
        self.max_body_bytes = max_body_bytes  # read per request (the reward service sets it per app)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status_holder = {"status": 500, "sent": False, "started": False}

        async def send_wrapped(message) -> None:
            if message["type"] == "http.response.start":
                if status_holder["sent"]:
                    return
                status_holder["status"] = message["status"]
                status_holder["started"] = True
            elif status_holder["sent"] and status_holder.get("own_done"):
                return
            await send(message)

        try:
            rejection = self._check_headers(scope, path)
            if rejection is not None:
                await rejection(scope, receive, send_wrapped)
                return
            try:
                await self.app(
                    scope, self._limited(receive, scope, send_wrapped, status_holder), send_wrapped
                )
            except Exception:
                if status_holder["sent"]:  # the 413 went out; the app only saw the cut-off body
                    return
                logger.exception("unexpected error answering %s %s", scope.get("method"), path)
                if status_holder["started"]:
                    return  # the answer is on its way: nothing more can be sent
                await error_response(
                    503,
                    "the service hit an unexpected error answering this request (logged); retry later, and "
                    "report it if it persists",
                    code="internal_error",
                    type_="server_error",
                    headers={"Retry-After": str(self.retry_after_s)},
                )(scope, receive, send_wrapped)
        finally:
            obs = self.observe()
            if obs is not None:
                obs(route, scope.get("method", ""), status_holder["status"], time.perf_counter() - start)

    def _check_headers(self, scope, path: str):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = os.environ.get(API_KEY_ENV, "")
        if key and path not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
            if not ok:
                why = "missing" if not given else "wrong"
                return error_response(
                    401,
                    f"Authorization header {why}: send 'Authorization: Bearer <key>' with the service's API key",
                    param="Authorization",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.strip().isdigit()):
                return error_response(
                    400,
                    f"Content-Length={length!r} is not a non-negative integer",
                    param="Content-Length",
                    code="invalid_header",
                )
            n = int(length)
            if n > self.max_body_bytes():
                return _too_large(n, limit=self.max_body_bytes())
        ctype = headers.get("content-type")
        if scope.get("method") == "POST" and ctype is not None:
            media = ctype.split(";")[0].strip().lower()
            if media not in JSON_TYPES and not (media.startswith("application/") and media.endswith("+json")):
                return error_response(
                    415,
                    f"Content-Type={ctype[:100]!r} is not supported: send the body as JSON "
                    "(Content-Type: application/json)",
                    param="Content-Type",
                    code="unsupported_media_type",
                )
        return None

    def _limited(self, receive, scope, send, holder):
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes():
                    await _too_large(seen, streamed=True, limit=self.max_body_bytes())(scope, receive, send)
                    holder["sent"] = holder["own_done"] = True
                    return {"type": "http.disconnect"}
            return message

        return receive_limited


def _too_large(n: int, streamed: bool = False, limit: int = MAX_BODY_BYTES) -> JSONResponse:
    size = f"more than {n} bytes" if streamed else f"{n} bytes"
    return error_response(
        413,
        f"request body is {size}; the limit is {limit} bytes ({limit / 1024:g} KiB)",
        param="body",
        code="body_too_large",
    )


def exception_status(exc: BaseException) -> int | None:
    """The HTTP status an exception (or the error it wraps, across a Ray call) carries, if any."""
    return _carrier(exc)[1]


def _carrier(exc: BaseException) -> tuple[BaseException, int | None]:
    """The exception (exc, the error it wraps across a Ray call, or its __cause__) with an HTTP status."""
    for e in (getattr(exc, "cause", None), exc.__cause__, exc):  # Ray's RayTaskError(X) is an X too
        code = getattr(type(e), "status_code", None) if e is not None else None
        if isinstance(code, int):
            return e, code
    return getattr(exc, "cause", None) or exc, None


def exception_response(exc: BaseException, retry_after_s: int) -> JSONResponse | None:
    """The answer for an exception that carries an HTTP status (``status_code`` on its class, and optionally
    ``code``, ``param``, ``limit``): its first line as the message; 503s get Retry-After. None if it carries
    none (an unexpected error: the caller decides)."""
    carrier, status = _carrier(exc)
    if status is None:
        return None
    lines = str(carrier).strip().splitlines() or [type(carrier).__name__]
    headers = {"Retry-After": str(retry_after_s)} if status in (503, 504) else None
    return error_response(
        status,
        lines[0],
        param=getattr(carrier, "param", None),
        code=getattr(carrier, "code", None) or "invalid_request",
        limit=getattr(carrier, "limit", None),
        headers=headers,
    )
