"""The image service's robustness without Ray: cancellation of a generation, cost limits, the pinned LRU of
loaded models, corrupt and half-written checkpoints, and the HTTP plumbing under hostile input (a small
FastAPI app with the service's handlers and guard, through Starlette's in-process client)."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from starlette.exceptions import HTTPException as StarletteHTTPException

from scoreaction.checkpoint import LORA_FILE, METADATA_FILE, save_run_checkpoint
from scoreaction.config import ModelConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.serving.api import GenerateRequest, ModelList, OpenAIImageRequest
from scoreaction.serving.catalog import (
    CheckpointCatalog,
    ModelIdError,
    ModelNotReadyError,
    UnusableModelError,
)
from scoreaction.serving.generate import ImageGenerator, LoadedModel
from scoreaction.serving.model_cache import ModelCache, ModelSlotsBusyError
from scoreaction.serving.spec import (
    CancelToken,
    CostLimits,
    GenerationCancelled,
    GenerationSpec,
    InvalidRequestError,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serve/ package at the repo root
from serve.web import (  # noqa: E402
    GuardMiddleware,
    SafeJSONResponse,
    error_response,
    exception_response,
    http_error_handler,
    validation_error_handler,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def generator(tiny_dir):
    return ImageGenerator(
        DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir))), 4
    )


def count_steps(generator: ImageGenerator, monkeypatch, on_call=None) -> list[int]:
    """Count predict_eps calls (one per chunk per denoising step); on_call(count) runs before each."""
    calls = [0]
    real = generator.policy.predict_eps

    def counted(*args, **kwargs):
        calls[0] += 1
        if on_call is not None:
            on_call(calls[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(generator.policy, "predict_eps", counted)
    return calls


# --------------------------------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------------------------------


def test_cancelled_generation_stops_within_one_step_and_frees_the_lock(generator, monkeypatch):
    spec = GenerationSpec(prompt="a cat", seed=1, num_inference_steps=50, guidance_scale=1.0)
    token = CancelToken()
    calls = count_steps(generator, monkeypatch, lambda n: token.cancel("test") if n == 3 else None)
    with pytest.raises(GenerationCancelled, match="test"):
        generator.generate(LoadedModel("base"), [spec], [token])
    # one chunk (n=1 <= chunk 4), cancelled during step 3: step 3 finishes, step 4 never starts
    assert calls[0] == 3
    assert generator._lock.acquire(blocking=False)
    generator._lock.release()


def test_a_deadline_alone_cancels(generator, monkeypatch):
    calls = count_steps(generator, monkeypatch)
    spec = GenerationSpec(prompt="a cat", seed=1, num_inference_steps=50, guidance_scale=1.0)
    with pytest.raises(GenerationCancelled, match="deadline"):
        generator.generate(LoadedModel("base"), [spec], [CancelToken(timeout_s=0.0)])
    assert calls[0] == 0


def test_cancelled_rows_are_dropped_and_the_others_unchanged(generator, monkeypatch):
    """Two requests share a call; one is cancelled mid-way: its rows go, the other's bytes equal its solo run
    (every network call runs on exactly `chunk` rows, so neighbours never change a sample)."""
    keep = GenerationSpec(prompt="a red bicycle", seed=11, n=2, num_inference_steps=4, guidance_scale=7.5)
    drop = GenerationSpec(prompt="a dog", seed=3, n=3, num_inference_steps=4, guidance_scale=7.5)
    alone = generator.generate(LoadedModel("base"), [keep])[0]
    token = CancelToken()
    calls = count_steps(generator, monkeypatch, lambda n: token.cancel() if n == 2 else None)
    out = generator.generate(LoadedModel("base"), [drop, keep], [token, None])
    assert out[0] is None and out[1] == alone
    # cancelled during step 1 (its 2nd chunk): 5 rows = 2 chunks in step 1, then 2 rows = 1 chunk in steps 2-4
    assert calls[0] == 2 + 3 * 1


def test_a_cancelled_request_stops_waiting_for_the_lock(generator):
    spec = GenerationSpec(prompt="a cat", seed=1, num_inference_steps=2)
    token = CancelToken()
    result: list[BaseException] = []

    def run() -> None:
        try:
            generator.generate(LoadedModel("base"), [spec], [token])
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)

    with generator._lock:  # a long generation holds the model
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.2)
        assert thread.is_alive()
        t0 = time.monotonic()
        token.cancel("client went away")
        thread.join(5)
        assert not thread.is_alive() and time.monotonic() - t0 < 1.0
    assert isinstance(result[0], GenerationCancelled)


# --------------------------------------------------------------------------------------------------
# Cost limits
# --------------------------------------------------------------------------------------------------


def test_cost_limits_name_the_limit_the_value_and_what_is_allowed(generator):
    limits = CostLimits(max_pixel_steps=4 * 64 * 64 * 20)  # tiny: native 64 px, max side 2 x 64 = 128
    generator.check(GenerationSpec(prompt="a", seed=0, n=4, num_inference_steps=20), limits)  # exactly at it
    with pytest.raises(InvalidRequestError) as info:
        generator.check(GenerationSpec(prompt="a", seed=0, n=4, num_inference_steps=21), limits)
    err = info.value
    assert err.code == "cost_limit" and err.status_code == 422
    assert err.limit == {"name": "max_pixel_steps", "value": 4 * 64 * 64 * 21, "allowed": 4 * 64 * 64 * 20}
    assert "4 x 64 x 64 x 21" in str(err)
    with pytest.raises(InvalidRequestError) as info:
        generator.check(GenerationSpec(prompt="a", seed=0, width=136, height=64), CostLimits())
    assert info.value.param == "width" and info.value.limit == {
        "name": "max_side_px",
        "value": 136,
        "allowed": 128,
    }
    generator.check(GenerationSpec(prompt="a", seed=0, width=128, height=128), CostLimits())
    with pytest.raises(InvalidRequestError, match="at most 96 px"):
        generator.check(GenerationSpec(prompt="a", seed=0, height=104), CostLimits(max_side_px=96))
    # the limits survive a round trip through pickle (how Ray carries the error to the ingress)
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert (again.code, again.limit, again.param, str(again)) == (err.code, err.limit, err.param, str(err))


# --------------------------------------------------------------------------------------------------
# The LRU of loaded models
# --------------------------------------------------------------------------------------------------


class FakeModel:
    def __init__(self, key: str, log: list) -> None:
        self.key, self.log = key, log

    def unload(self) -> None:
        self.log.append(("unload", self.key))


def test_model_cache_never_evicts_a_model_in_use():
    log: list = []

    def load(key, path, model_id):
        time.sleep(0.01)
        log.append(("load", key))
        return FakeModel(key, log)

    async def scenario() -> None:
        cache = ModelCache(load, capacity=2)
        in_use: set[str] = set()

        async def request(key: str, hold_s: float) -> str:
            async with cache.use(key, None, wait_s=5) as model:
                in_use.add(key)
                # nothing unloaded a model a request is using
                assert all(("unload", k) not in log[-1:] for k in in_use)
                await asyncio.sleep(hold_s)
                in_use.discard(key)
                return model.key

        # five distinct models at once, two slots: each request gets its own model, loads wait for slots
        keys = await asyncio.gather(*(request(f"m{i}", 0.05) for i in range(5)))
        assert keys == [f"m{i}" for i in range(5)]
        assert len(cache.keys()) <= 2
        for i, event in enumerate(log):  # every unload happened when that model was not pinned...
            if event[0] == "unload":
                loads_before = [e for e in log[:i] if e == ("load", event[1])]
                assert loads_before  # ...and only of a model that was loaded
        assert sum(e[0] == "load" for e in log) == 5

        # every slot pinned: a third model waits up to wait_s, then ModelSlotsBusyError
        async with cache.use("a", None), cache.use("b", None):
            t0 = time.monotonic()
            with pytest.raises(ModelSlotsBusyError, match="all 2 model slots"):
                async with cache.use("c", None, wait_s=0.2):
                    pass
            assert 0.15 < time.monotonic() - t0 < 2
        # the same model is shared, not loaded twice
        loads = sum(e == ("load", "a") for e in log)
        async with cache.use("a", None), cache.use("a", None):
            assert cache.pins("a") == 2
        assert sum(e == ("load", "a") for e in log) == loads

    asyncio.run(scenario())


def test_model_cache_forgets_a_failed_load():
    calls = []

    def load(key, path, model_id):
        calls.append(key)
        raise UnusableModelError(f"model={model_id!r} cannot be loaded: truncated")

    async def scenario() -> None:
        cache = ModelCache(load, capacity=1)
        for _ in range(2):
            with pytest.raises(UnusableModelError, match="truncated"):
                async with cache.use("bad", "/x", "run@step_000001"):
                    pass
        assert cache.keys() == [] and calls == ["bad", "bad"]
        async with ModelCache(lambda k, p, m: FakeModel(k, []), 1).use("ok", None) as m:
            assert m.key == "ok"

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# Corrupt and half-written checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory, tiny_dir):
    """A root with one good run and every kind of broken one (the tests only read it)."""
    root = tmp_path_factory.mktemp("outputs")
    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    randomize_lora(policy, seed=1)
    good = save_run_checkpoint(policy, root / "good", 1, metrics={"rollout/reward_mean": -3.5})
    for run in (
        "badjson",
        "listmeta",
        "nanreward",
        "truncated",
        "nanweights",
        "nolora",
        "halfway",
        "oddlatest",
    ):
        save_run_checkpoint(policy, root / run, 1, metrics={"rollout/reward_mean": -3.0})
    ck = "checkpoints/step_000001"
    (root / "badjson" / ck / METADATA_FILE).write_text("{not json")
    (root / "listmeta" / ck / METADATA_FILE).write_text("[1, 2]")
    meta = json.loads((good / METADATA_FILE).read_text())
    meta["metrics"] = {"rollout/reward_mean": math.nan}
    meta["created_at"] = "yesterday"
    meta["config"] = {"reward": "not a dict"}
    (root / "nanreward" / ck / METADATA_FILE).write_text(json.dumps(meta))
    (root / "nanreward" / "summary.json").write_text("[1]")
    weights = (root / "truncated" / ck / LORA_FILE).read_bytes()
    (root / "truncated" / ck / LORA_FILE).write_bytes(weights[: len(weights) // 2])
    state = load_file(str(root / "nanweights" / ck / LORA_FILE))
    name = next(iter(state))
    state[name] = torch.full_like(state[name], math.nan)
    save_file(state, str(root / "nanweights" / ck / LORA_FILE))
    (root / "nolora" / ck / LORA_FILE).unlink()
    (root / "halfway" / "checkpoints" / "step_000002").mkdir()  # being written, no metadata yet
    (root / "halfway" / "checkpoints" / ".staging-step_000003-abcd").mkdir()  # the trainer's staging
    (root / "oddlatest" / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    (root / "empty" / "checkpoints").mkdir(parents=True)  # a run before its first checkpoint
    return root


def test_one_bad_run_folder_never_breaks_the_listing(broken_root):
    models = CheckpointCatalog(broken_root).list_models()
    body = ModelList(default="base", data=models).model_dump(mode="json")  # validates as the route does
    SafeJSONResponse(body).body.decode()  # and encodes (NaN became None)
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["good@step_000001"]["available"] and by_id["good"]["alias_of"] == "good@step_000001"
    for bad in ("badjson@step_000001", "listmeta@step_000001"):
        assert not by_id[bad]["available"] and "cannot be served" in by_id[bad]["reason"], by_id[bad]
        assert str(broken_root) not in by_id[bad]["reason"]  # no server paths
    assert by_id["nanreward@step_000001"]["reward"] is None and by_id["nanreward@step_000001"]["created"] == 0
    assert (
        not by_id["halfway@step_000002"]["available"]
        and "being written" in by_id["halfway@step_000002"]["reason"]
    )
    assert not any("staging" in i for i in by_id)
    assert by_id["oddlatest"]["alias_of"] == "oddlatest@step_000001"  # unreadable 'latest': newest complete
    assert not by_id["empty"]["available"] and "no complete checkpoint" in by_id["empty"]["reason"]


def test_broken_checkpoints_answer_clear_errors(broken_root, generator):
    cat = CheckpointCatalog(broken_root)
    with pytest.raises(UnusableModelError, match="not valid JSON") as info:
        cat.resolve("badjson@step_000001")
    assert info.value.status_code == 422 and str(broken_root) not in str(info.value)
    with pytest.raises(UnusableModelError, match="listmeta@step_000001' cannot be served"):
        cat.resolve("listmeta")
    with pytest.raises(ModelNotReadyError, match="being written") as info:
        cat.resolve("halfway@step_000002")
    assert info.value.status_code == 503
    with pytest.raises(ModelNotReadyError, match="no complete checkpoint"):
        cat.resolve("empty")
    assert cat.resolve("oddlatest").id == "oddlatest@step_000001"
    for run, why in (
        ("truncated", "Safetensor|deserializ|header"),
        ("nanweights", "non-finite"),
        ("nolora", "has no"),
    ):
        resolved = cat.resolve(run)
        with pytest.raises(UnusableModelError, match=why) as info:
            generator.load(resolved.key, resolved.path, resolved.id)
        assert str(broken_root) not in str(info.value) and f"{run}@step_000001" in str(info.value)
    assert [n for n in generator.policy.unet.peft_config if n.startswith("served_")] == []  # nothing left
    good = cat.resolve("good")
    generator.load(good.key, good.path, good.id).unload()


@pytest.mark.parametrize(
    "bad", ["base\n", "good\n", "good@step_000001\n", "good@step_٠٠٠٠٠١", "ｇood", "good\ud800", "\ud800"]
)
def test_model_ids_with_newlines_unicode_digits_or_surrogates_are_refused(bad, tmp_path):
    (tmp_path / "good" / "checkpoints" / "step_000001").mkdir(parents=True)
    with pytest.raises(ModelIdError) as info:
        CheckpointCatalog(tmp_path).resolve(bad)
    str(info.value).encode("utf-8")  # the message always encodes


# --------------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "model"])
def test_lone_surrogates_are_refused_in_every_text_field(field):
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "a", field: "x\ud800y"})
    assert info.value.errors()[0]["loc"][0] == field
    for f in ("prompt", "model", "size", "quality", "style", "user"):
        with pytest.raises(ValidationError):
            OpenAIImageRequest.model_validate({"prompt": "a", f: "\udc00"})
    assert GenerateRequest(prompt="\U0001f600").prompt == "\U0001f600"  # a whole pair is fine


@pytest.mark.parametrize(
    "size", ["５１２x５１２", "64x64\n", "٦٤x٦٤", " 64x64", "64x64 ", "+64x64", "64x-64"]
)
def test_size_takes_ascii_digits_only(size):
    with pytest.raises(ValidationError, match="ASCII digits"):
        OpenAIImageRequest(prompt="a", size=size)


# --------------------------------------------------------------------------------------------------
# HTTP plumbing under hostile input
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    app = FastAPI(default_response_class=SafeJSONResponse)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_middleware(GuardMiddleware)

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest):
        return {"prompt": body.prompt}

    @app.post("/v1/images/generations")
    async def images(body: OpenAIImageRequest):
        return {"size": body.size}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    @app.get("/limit")
    async def limit():
        exc = InvalidRequestError("too big", param=None, code="cost_limit", limit={"name": "x", "value": 2})
        return exception_response(exc, 1)

    return TestClient(app, raise_server_exceptions=False)


def assert_json_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


HOSTILE = [
    # (raw body, content type, status, code)
    (b'{"prompt": "\\ud800"}', "application/json", 422, "validation_error"),
    (b'{"prompt": "a", "negative_prompt": "\\udfff\\ud800"}', "application/json", 422, "validation_error"),
    (b'{"prompt": "a", "\\ud800": 1}', "application/json", 422, "validation_error"),
    (b'{"\\ud800": "\\ud800"}', "application/json", 422, "validation_error"),
    (b'{"prompt": "a", "model": "demo\\n"}', "application/json", 200, None),  # the catalog refuses it (400)
    (b'{"prompt": "a", "n": 1e400}', "application/json", 422, "validation_error"),
    (b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}", "application/json", 400, None),
    (b'{"prompt": "a", "n": -99999999999999999999999}', "application/json", 422, "validation_error"),
    (b'{"prompt": "a", "seed": 18446744073709551616}', "application/json", 422, "validation_error"),
    (b'{"prompt": "a", "n": 2.0}', "application/json", 422, "validation_error"),
    (b'{"prompt": "a", "n": false}', "application/json", 422, "validation_error"),
    (b'{"prompt": ["a"]}', "application/json", 422, "validation_error"),
    (b'{"prompt": {"\\ud800": 1}}', "application/json", 422, "validation_error"),
    (b"null", "application/json", 422, "validation_error"),
    (b'"a cat"', "application/json", 422, "validation_error"),
    (b"42", "application/json", 422, "validation_error"),
    (b"", "application/json", 422, None),
    (b"[" * 20000 + b"]" * 20000, "application/json", 400, None),
    (b'{"prompt": "\xff\xfe"}', "application/json", 400, None),
    (b'{"prompt": "a"}', "text/plain", 415, "unsupported_media_type"),
    (b'{"prompt": "a"}', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b"prompt=a", "multipart/form-data; boundary=x", 415, "unsupported_media_type"),
    (b'{"prompt": "a"}', "application/vnd.api+json", 200, None),
]


@pytest.mark.parametrize("body,ctype,status,code", HOSTILE, ids=[f"{i}" for i in range(len(HOSTILE))])
def test_hostile_bodies_get_json_errors_never_500(client, body, ctype, status, code):
    r = client.post("/v1/generate", content=body, headers={"Content-Type": ctype})
    if status == 200:
        assert r.status_code == 200, r.text
        return
    err = assert_json_error(r, status, code)
    json.dumps(err).encode("utf-8")


def test_surrogate_errors_name_the_field_and_encode(client):
    r = client.post(
        "/v1/generate", content=b'{"prompt": "a\\ud800b"}', headers={"Content-Type": "application/json"}
    )
    err = assert_json_error(r, 422, "validation_error")
    assert err["param"] == "prompt" and "surrogate" in err["message"]
    assert err["errors"][0]["value"] == "a\ufffdb"
    r = client.post("/v1/images/generations", json={"prompt": "a", "size": "５１２x５１２"})
    err = assert_json_error(r, 422)
    assert err["param"] == "size" and "ASCII" in err["message"]


def test_unexpected_exceptions_are_a_503_never_a_500(client):
    r = client.get("/boom")
    err = assert_json_error(r, 503, "internal_error")
    assert r.headers["retry-after"] == "1" and err["type"] == "server_error"


def test_limit_errors_carry_the_limit(client):
    err = assert_json_error(client.get("/limit"), 422, "cost_limit")
    assert err["limit"] == {"name": "x", "value": 2}


def test_bad_headers(client):
    r = client.post("/v1/generate", content=b'{"prompt": "a"}', headers={"Content-Length": "١٥".encode()})
    assert r.status_code in (400, 422), r.text  # never a 500; the proxy usually refuses it first
    err = error_response(400, "x\ud800", param="\udc00")
    assert json.loads(err.body)["error"]["param"] == "\ufffd"
