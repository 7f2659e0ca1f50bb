"""One generation request as a model replica sees it: its parameters, its cost limits, its cancellation.

``GenerationSpec`` is one request; requests with equal ``batch_key`` share network calls. ``CostLimits``
bounds a request (checked by ``ImageGenerator.check``: its longest side, by default a small multiple of the
model's native size, and its pixel-steps, n x height x width x steps; ``InvalidRequestError``, HTTP 422).
``CancelToken`` is set when the request's caller gives up (a timeout, a client gone) or past its own
deadline; ``GenerationCancelled`` (HTTP 504) says a whole generate call was cancelled.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any


class InvalidRequestError(ValueError):
    """Parameters the API bounds allow but this model or the service's limits do not (HTTP 422). ``limit``:
    {"name", "value", "allowed"} when a configured limit refused the request."""

    status_code = 422

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str = "invalid_request",
        limit: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)  # args = (message,): pickles across Ray with the attributes below
        self.param, self.code, self.limit = param, code, limit


class GenerationCancelled(RuntimeError):
    """Every request of a generate call was cancelled (timed out or given up): the compute stopped."""

    status_code = 504
    code = "timeout"


class CancelToken:
    """Cancellation of one request: ``cancel()`` (its caller gave up) or its deadline passed. Thread-safe."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self._event = threading.Event()
        self.deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self.reason = ""

    def cancel(self, reason: str = "cancelled by its caller") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set() and self.deadline is not None and time.monotonic() >= self.deadline:
            self.cancel("past its deadline")
        return self._event.is_set()

    def remaining(self) -> float | None:
        """Seconds to the deadline (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class CostLimits:
    """Per-request bounds (serve/config.yaml ``user_config``)."""

    max_pixel_steps: int | None = None  # n x height x width x num_inference_steps; None: unbounded
    max_side_px: int | None = None  # longest allowed side; None: max_side_factor x the native size
    max_side_factor: float = 2.0


@dataclass(frozen=True)
class GenerationSpec:
    """One request. Requests in one ``generate`` call share height, width, steps, guidance and eta."""

    prompt: str
    seed: int
    n: int = 1
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    eta: float = 1.0
    height: int | None = None
    width: int | None = None

    def batch_key(self) -> tuple:
        """Requests with equal keys can share UNet calls."""
        return (self.height, self.width, self.num_inference_steps, self.guidance_scale, self.eta)
