"""The replica's LRU of loaded models, pinned while in use.

A request pins its model from before it queues until its generation ends, so a model in use is never
evicted; when every slot is pinned a new model waits for one, up to a bound, then ``ModelSlotsBusyError``
(HTTP 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scoreaction.serving.generate import LoadedModel


class ModelSlotsBusyError(RuntimeError):
    """Every slot of the replica's model LRU holds a model in use (HTTP 503 with Retry-After)."""

    status_code = 503
    code = "model_slots_busy"
    param = "model"


@dataclass
class _Slot:
    task: asyncio.Future  # the load: its result is the LoadedModel
    pins: int = 0


class ModelCache:
    """At most ``capacity`` loaded models, least recently used evicted first, never one in use.

    ``use(key, path)`` pins the model (loading it if needed) for the ``async with`` block. A load that
    needs a slot evicts the least recently used unpinned model (unloading it in the same worker thread,
    before the new load); when every slot is pinned it waits for one up to ``wait_s``, then raises
    ModelSlotsBusyError. Runs on one event loop (a Serve replica's); loads and unloads run in threads and
    go on when the request that started them is cancelled (the next request finds the model loaded).
    """

    def __init__(self, load: Callable[[str, str | None, str | None], LoadedModel], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self._load = load
        self.capacity = capacity
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._waiters: set[asyncio.Future] = set()

    def keys(self) -> list[str]:
        """Keys held or loading, least recently used first."""
        return list(self._slots)

    def pins(self, key: str) -> int:
        slot = self._slots.get(key)
        return slot.pins if slot is not None else 0

    @contextlib.asynccontextmanager
    async def use(
        self, key: str, path: str | None, model_id: str | None = None, wait_s: float = 10.0
    ) -> AsyncIterator[LoadedModel]:
        slot = await self._pin(key, path, model_id, wait_s)
        try:
            model = await asyncio.shield(slot.task)
            yield model
        finally:
            slot.pins -= 1
            self._wake()

    async def _pin(self, key: str, path: str | None, model_id: str | None, wait_s: float) -> _Slot:
        deadline = time.monotonic() + wait_s
        while True:
            slot = self._slots.get(key)
            if slot is not None:
                slot.pins += 1
                self._slots.move_to_end(key)
                return slot
            evicted = self._evict() if len(self._slots) >= self.capacity else None
            if len(self._slots) < self.capacity:
                task = asyncio.ensure_future(asyncio.to_thread(self._swap, evicted, key, path, model_id))
                slot = self._slots[key] = _Slot(task, pins=1)
                task.add_done_callback(functools.partial(self._loaded, key, slot))
                return slot
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModelSlotsBusyError(
                    f"all {self.capacity} model slots of this replica (max_loaded_models) hold models in use by "
                    f"other requests, and none freed within {wait_s:g} s; retry later"
                )
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)

    def _evict(self) -> LoadedModel | None:
        """Drop the least recently used loaded, unpinned model from the table; the caller unloads it."""
        for key, slot in self._slots.items():
            if slot.pins == 0 and slot.task.done():
                del self._slots[key]
                if slot.task.cancelled() or slot.task.exception() is not None:
                    return None
                return slot.task.result()
        return None

    def _swap(self, old: LoadedModel | None, key: str, path: str | None, model_id: str | None) -> LoadedModel:
        if old is not None:
            old.unload()
        return self._load(key, path, model_id)

    def _loaded(self, key: str, slot: _Slot, task: asyncio.Future) -> None:
        if task.cancelled() or task.exception() is not None:  # also marks the exception retrieved
            if self._slots.get(key) is slot:
                del self._slots[key]
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
