"""The image service over real HTTP on loopback: serve/config.yaml deployed through the Serve controller's
config path (what `serve deploy` / `serve run config.yaml` use), tiny checkpoints written by the test.

One Ray instance and one deployment for the whole module; config updates go through the same path, so a
changed user_config reaches `reconfigure` on the running replicas (re-running `serve.run` would restart them).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import randomize_lora
from PIL import Image

from scoreaction.checkpoint import save_run_checkpoint
from scoreaction.config import ModelConfig
from scoreaction.policy import DiffusionPolicy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP = "scoreaction"
STEPS = 3  # denoising steps of most test requests: the service, not image quality, is under test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


class Service:
    def __init__(self, config: dict, root: Path, port: int, policy: DiffusionPolicy) -> None:
        self.config, self.root, self.policy = config, root, policy
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers=AUTH)

    def deploy(self, **settings) -> None:
        """Apply a config with these user_config changes through the controller (serve deploy semantics)."""
        from ray import serve
        from ray.serve.schema import ServeDeploySchema

        cfg = copy.deepcopy(self.config)
        for d in cfg["applications"][0]["deployments"]:
            d["user_config"] = dict(d["user_config"], **settings)
        serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg))
        serve.context._get_global_client()._wait_for_application_running(APP, timeout_s=600)

    def replicas(self) -> set[str]:
        import ray

        return {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]
        }

    def wait_default(self, model: str) -> None:
        deadline = time.time() + 120
        while self.http.get("/healthz").json()["default_model"] != model:
            assert time.time() < deadline, f"default_model never became {model!r}"
            time.sleep(0.5)

    def generate(self, **body) -> httpx.Response:
        return self.http.post("/v1/generate", json={"prompt": "a cat", "num_inference_steps": STEPS, **body})


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_dir):
    import ray
    from ray import serve

    root = tmp_path_factory.mktemp("outputs")
    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    randomize_lora(policy, seed=1)
    save_run_checkpoint(policy, root / "demo", 1, metrics={"rollout/reward_mean": -3.5})

    metrics_port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port)
    port = free_port()  # after ray.init, which takes ports of its own
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port, "request_timeout_s": 300}
    app = config["applications"][0]
    app["runtime_env"] = {
        "env_vars": {
            "SCOREACTION_API_KEY": KEY,
            "HF_HUB_OFFLINE": "1",
            "SCOREACTION_CACHE": os.environ["SCOREACTION_CACHE"],
            "PYTHONPATH": str(REPO),
        }
    }
    app["args"]["base_model"] = {"preset": "tiny", "name_or_path": str(tiny_dir), "device": "cpu"}
    ingress, model = app["deployments"]
    model.update(max_ongoing_requests=4, max_queued_requests=4)  # a deliberately small queue
    for d in (ingress, model):
        # max_pixel_steps: 2 x 128 x 128 x 120 fits (the slow request of the timeout test), 4 x 128^2 x 150 not
        d["user_config"] = dict(
            d["user_config"], checkpoint_root=str(root), max_batch_size=4, max_pixel_steps=4_000_000
        )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        svc = Service(config, root, port, policy)
        svc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        svc.deploy()
        yield svc
    finally:
        serve.shutdown()
        ray.shutdown()


def assert_documented(r: httpx.Response) -> None:
    """Every answer is a 2xx, a 4xx or a 503/504, and every error has the documented JSON shape."""
    assert r.status_code < 300 or 400 <= r.status_code < 500 or r.status_code in (503, 504), (
        r.status_code,
        r.text,
    )
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), r.headers
        err = r.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err) and err["message"], err
        if r.status_code in (503, 504):
            assert int(r.headers["retry-after"]) >= 0


def assert_error(r: httpx.Response, status: int, param: str | None = None, text: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert_documented(r)
    err = r.json()["error"]
    assert err["message"] and text.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_health_and_auth(service):
    bare = httpx.Client(base_url=service.http.base_url, timeout=60)
    assert bare.get("/healthz").status_code == 200  # no key needed
    for path in ("/v1/models", "/docs", "/openapi.json"):
        assert_error(bare.get(path), 401, "Authorization", "missing")
    assert_error(bare.post("/v1/generate", json={"prompt": "a"}), 401)
    wrong = {"Authorization": f"Bearer {KEY}x"}
    assert_error(bare.get("/v1/models", headers=wrong), 401, "Authorization", "wrong")
    assert_error(bare.get("/v1/models", headers={"Authorization": KEY}), 401)  # no Bearer scheme
    spec = service.http.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/images/generations", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert service.http.get("/docs").status_code == 200


def test_generate_is_deterministic_and_negotiates_png(service):
    a, b = service.generate(seed=5).json(), service.generate(seed=5).json()
    assert a["images"] == b["images"] and a["seed"] == 5 and a["model"] == "base"
    assert (a["width"], a["height"]) == (64, 64) and decode_png(a["images"][0]["b64_png"]).size == (64, 64)
    assert set(a["timings"]) == {"queue_ms", "generate_ms", "total_ms", "batch_size"}
    r = service.http.post(
        "/v1/generate",
        json={"prompt": "a cat", "num_inference_steps": STEPS, "seed": 5},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "5"
    assert r.content == base64.b64decode(a["images"][0]["b64_png"])
    r = service.http.post("/v1/generate", json={"prompt": "a", "n": 2}, headers={"Accept": "image/png"})
    assert_error(r, 406, "n")
    # without a seed the service picks one and returns it; that seed reproduces the image
    c = service.generate(n=2).json()
    assert len(c["images"]) == 2 and c["images"][0] != c["images"][1]
    assert service.generate(n=2, seed=c["seed"]).json()["images"] == c["images"]


def test_base_and_checkpoint_differ_for_the_same_seed(service):
    base = service.generate(seed=9, model="base").json()
    tuned = service.generate(seed=9, model="demo@step_000001").json()
    assert tuned["model"] == "demo@step_000001"
    assert base["images"] != tuned["images"]
    assert service.generate(seed=9, model="demo@step_000001").json()["images"] == tuned["images"]


def test_openai_images_call_shape(service):
    """What openai.OpenAI(base_url=.../v1, api_key=KEY).images.generate(...) sends."""
    r = service.http.post(
        "/v1/images/generations",
        json={
            "prompt": "a lighthouse",
            "model": "demo",
            "n": 2,
            "size": "32x48",
            "response_format": "b64_json",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert decode_png(body["data"][0]["b64_json"]).size == (32, 48)
    r = service.http.post("/v1/images/generations", json={"prompt": "a", "response_format": "url"})
    assert_error(r, 422, "response_format", "b64_json")


def test_models_lists_checkpoints_written_after_start(service):
    ids = {m["id"]: m for m in service.http.get("/v1/models").json()["data"]}
    assert {"base", "demo", "demo@step_000001"} <= set(ids) and ids["demo@step_000001"]["step"] == 1
    assert ids["demo@step_000001"]["reward"] == -3.5
    randomize_lora(service.policy, seed=2)
    save_run_checkpoint(service.policy, service.root / "demo", 2, metrics={"rollout/reward_mean": -3.1})
    listing = service.http.get("/v1/models").json()
    ids = {m["id"]: m for m in listing["data"]}
    assert ids["demo@step_000002"]["step"] == 2 and ids["demo@step_000002"]["reward"] == -3.1
    assert ids["demo"]["alias_of"] == "demo@step_000002" and listing["default"] == "base"
    assert service.generate(seed=1, model="demo").json()["model"] == "demo@step_000002"


BAD = [
    # (body or raw bytes, status, param, text in the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b'{"prompt": "a", "guidance_scale": NaN}', 422, "guidance_scale", "finite"),
    (b'{"prompt": "a", "guidance_scale": Infinity}', 422, "guidance_scale", "finite"),
    (b'{"prompt": "a", "eta": -Infinity}', 422, "eta", "finite"),
    (b'{"prompt": "a", "guidance_scale": 1e999}', 422, "guidance_scale", "finite"),
    (b'["a cat"]', 422, "body", "dictionary"),
    ({"prompt": "a", "num_inference_steps": "20"}, 422, "num_inference_steps", "integer"),
    ({"prompt": "a", "n": True}, 422, "n", "integer"),
    ({"prompt": 5}, 422, "prompt", "string"),
    ({}, 422, "prompt", "required"),
    ({"prompt": "a", "num_inference_steps": 0}, 422, "num_inference_steps", "greater than or equal to 1"),
    ({"prompt": "a", "num_inference_steps": 151}, 422, "num_inference_steps", "150"),
    ({"prompt": "a", "guidance_scale": 30.01}, 422, "guidance_scale", "30"),
    ({"prompt": "a", "height": -64}, 422, "height", "multiple of 8 between 8 and 1024"),
    ({"prompt": "a", "width": 10**9}, 422, "width", "multiple of 8 between 8 and 1024"),
    ({"prompt": "a", "width": 100}, 422, "width", "multiple of 8"),
    ({"prompt": "a", "n": 5}, 422, "n", "4"),
    ({"prompt": "x" * 1001}, 422, "prompt", "1000 characters"),
    ({"prompt": "a", "steps": 5}, 422, "steps", "extra"),
    ({"prompt": "a", "model": "../demo"}, 400, "model", "never contain"),
    ({"prompt": "a", "model": "demo/../../etc"}, 400, "model", "never contain"),
    ({"prompt": "a", "model": "..\\demo"}, 400, "model", "never contain"),
    ({"prompt": "a", "model": ".."}, 400, "model", "never contain"),
    ({"prompt": "a", "model": "nope"}, 404, "model", "unknown"),
    ({"prompt": "a", "model": "demo@step_000777"}, 404, "model", "no checkpoint"),
    # text that is not valid Unicode, keys included (json.loads yields lone surrogates from "\ud800")
    (b'{"prompt": "a\\ud800"}', 422, "prompt", "surrogate"),
    (b'{"prompt": "a", "negative_prompt": "\\udc00"}', 422, "negative_prompt", "surrogate"),
    (b'{"prompt": "a", "model": "demo\\ud800"}', 422, "model", "surrogate"),
    (b'{"prompt": "a", "\\ud800": 1}', 422, "body", "surrogate"),
    (b'{"\\ud800": "\\ud800"}', 422, None, ""),
    # ids with a trailing newline or non-ASCII digits
    ({"prompt": "a", "model": "demo\n"}, 400, "model", "not a model id"),
    ({"prompt": "a", "model": "base\n"}, 400, "model", "not a model id"),
    ({"prompt": "a", "model": "demo@step_٠٠٠٠٠١"}, 400, "model", "not a model id"),
    # numbers: huge, negative, float, bool; wrong types; bodies that are not objects
    (b'{"prompt": "a", "seed": 18446744073709551616}', 422, "seed", "less than or equal"),
    (b'{"prompt": "a", "seed": -1}', 422, "seed", "greater than or equal"),
    (b'{"prompt": "a", "n": 1e400}', 422, "n", "integer"),
    (b'{"prompt": "a", "n": 2.0}', 422, "n", "integer"),
    (b'{"prompt": "a", "height": 64.0}', 422, "height", "integer"),
    (b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}", 400, None, "JSON"),
    ({"prompt": "a", "eta": False}, 422, "eta", "number"),
    ({"prompt": ["a"]}, 422, "prompt", "string"),
    ({"prompt": {"a": 1}}, 422, "prompt", "string"),
    (b"null", 422, "body", "dictionary"),
    (b"42", 422, "body", "dictionary"),
    (b'"a cat"', 422, "body", "dictionary"),
    (b"", 422, "body", "required"),
    (b"[" * 20000 + b"]" * 20000, 400, None, "JSON"),
    (b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    # bounded cost: the model's longest side (2 x its native 64 px) and the pixel-steps budget
    ({"prompt": "a", "width": 256}, 422, "width", "at most 128 px"),
    (
        {"prompt": "a", "n": 4, "width": 128, "height": 128, "num_inference_steps": 150},
        422,
        None,
        "max_pixel_steps",
    ),
]


@pytest.mark.parametrize("body,status,param,text", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_clear_json_error(service, body, status, param, text):
    if isinstance(body, bytes):
        r = service.http.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    else:
        r = service.http.post("/v1/generate", json=body)
    err = assert_error(r, status, param, text)
    if status == 422 and err["code"] == "validation_error" and param is not None:
        assert err["errors"][0]["field"] == param and "value" in err["errors"][0]


def test_over_budget_requests_name_the_limit_the_value_and_what_is_allowed(service):
    r = service.generate(n=4, width=128, height=128, num_inference_steps=150)
    err = assert_error(r, 422, None, "4 x 128 x 128 x 150")
    assert err["code"] == "cost_limit"
    assert err["limit"] == {"name": "max_pixel_steps", "value": 4 * 128 * 128 * 150, "allowed": 4_000_000}
    r = service.http.post("/v1/images/generations", json={"prompt": "a", "size": "64x256"})
    err = assert_error(r, 422, "height", "at most 128 px")
    assert err["code"] == "size_limit" and err["limit"] == {
        "name": "max_side_px",
        "value": 256,
        "allowed": 128,
    }
    r = service.http.post("/v1/images/generations", json={"prompt": "a", "size": "５１２x５１２"})
    assert_error(r, 422, "size", "ASCII digits")


def test_odd_requests_never_answer_500(service):
    """Content types, methods, paths and headers outside the API: documented JSON errors, never a 500."""
    body = b'{"prompt": "a", "num_inference_steps": 2}'
    for ctype in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "image/png",
    ):
        r = service.http.post("/v1/generate", content=body, headers={"Content-Type": ctype})
        assert_error(r, 415, "Content-Type", "application/json")
    answers = [
        service.http.put("/v1/generate", content=body),
        service.http.get("/v1/generate"),
        service.http.post("/v1/models"),
        service.http.get("/v1/nope/%ED%A0%80"),
        service.http.get("/v1/models?limit=%ED%A0%80"),
        service.http.post("/v1/generate", content=body, headers={"Accept": "image/png;q=nan, */*;q=inf"}),
        service.http.post(
            "/v1/generate", content=body, headers={"Content-Type": "application/json; charset=latin-1"}
        ),
        service.http.post("/v1/images/generations", content=b'{"prompt": "a", "user": "\\ud800"}'),
    ]
    for r in answers:
        assert_documented(r)
    assert [r.status_code for r in answers[:4]] == [405, 405, 405, 404]


def test_broken_checkpoints_answer_clear_errors_and_never_break_the_listing(service):
    """A corrupt checkpoint is a 422, one still being written a 503 + Retry-After, and GET /v1/models lists
    both as unavailable with the reason."""
    run = service.root / "broken"
    save_run_checkpoint(service.policy, run, 1)
    weights = run / "checkpoints" / "step_000001" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    save_run_checkpoint(service.policy, run, 2)
    (run / "checkpoints" / "step_000002" / "checkpoint.json").write_text("{not json")
    (run / "checkpoints" / "step_000003").mkdir()  # renamed into place, metadata not yet written
    listing = service.http.get("/v1/models")
    assert listing.status_code == 200, listing.text
    ids = {m["id"]: m for m in listing.json()["data"]}
    assert ids["demo@step_000001"]["available"]
    assert (
        not ids["broken@step_000002"]["available"] and "not valid JSON" in ids["broken@step_000002"]["reason"]
    )
    assert (
        not ids["broken@step_000003"]["available"] and "being written" in ids["broken@step_000003"]["reason"]
    )
    err = assert_error(service.generate(model="broken@step_000001"), 422, "model", "cannot be loaded")
    assert err["code"] == "model_unusable" and str(service.root) not in err["message"]
    err = assert_error(service.generate(model="broken@step_000002"), 422, "model", "not valid JSON")
    r = service.generate(model="broken@step_000003")
    err = assert_error(r, 503, "model", "being written")
    assert err["code"] == "model_not_ready" and r.headers["retry-after"] == "1"
    assert service.generate(seed=1, model="demo@step_000001").status_code == 200  # the rest serves on


def test_more_distinct_checkpoints_at_once_than_the_lru_holds(service):
    """Waves of 4 distinct models at once on a replica holding 3 (max_loaded_models): a model in use is never
    evicted, so every answer is the image that model gives alone (200), or a 503 + Retry-After saying every
    slot is busy; never a 500. (4 at a time: the model deployment's queue holds 4, so Serve's own
    backpressure never answers instead.)"""
    for step in range(11, 17):
        randomize_lora(service.policy, seed=step)
        save_run_checkpoint(service.policy, service.root / "many", step)
    waves = [
        [f"many@step_{s:06d}" for s in range(11, 15)],
        ["many@step_000015", "many@step_000016", "base", "many@step_000011"],
    ]

    def one(model: str) -> httpx.Response:
        return service.generate(seed=4, model=model, num_inference_steps=2)

    for models in waves:
        with ThreadPoolExecutor(len(models)) as pool:
            answers = list(pool.map(one, models))
        for r in answers:
            assert_documented(r)
        assert [r.status_code for r in answers].count(200) >= 3, [r.text for r in answers]
        for model, r in zip(models, answers, strict=True):
            if r.status_code == 200:
                assert r.json()["model"] == model
                assert one(model).json()["images"] == r.json()["images"], model  # the right model, unharmed
            else:
                assert r.status_code == 503 and r.json()["error"]["code"] == "model_slots_busy", r.text
        served = [r.json()["images"][0]["b64_png"] for r in answers if r.status_code == 200]
        assert len(set(served)) == len(served)  # distinct models, distinct images


SLOW = {"n": 2, "width": 128, "height": 128, "num_inference_steps": 120, "guidance_scale": 7.5}


def test_a_timed_out_generation_stops_and_frees_the_replica(service):
    """A generation past request_timeout_s answers 504 and its compute stops within a step: a small request
    sent at once is answered in its normal time, not after the slow one's remaining minute. The same for a
    client that gives up and disconnects."""
    t0 = time.perf_counter()
    assert service.generate(seed=1).status_code == 200
    normal = time.perf_counter() - t0

    # a client that disconnects: its generation stops too
    impatient = httpx.Client(base_url=service.http.base_url, timeout=1.5, headers=AUTH)
    with pytest.raises(httpx.TimeoutException):
        impatient.post("/v1/generate", json={"prompt": "slow", "seed": 2, **SLOW})
    t0 = time.perf_counter()
    r = service.generate(seed=3)
    assert r.status_code == 200, r.text
    after_disconnect = time.perf_counter() - t0

    service.deploy(request_timeout_s=2, default_model="demo@step_000001")
    service.wait_default("demo@step_000001")  # the new settings are in effect
    try:
        t0 = time.perf_counter()
        r = service.generate(seed=2, model="base", **{"prompt": "slow", **SLOW})
        assert_error(r, 504, None, "request_timeout_s=2")
        assert time.perf_counter() - t0 < 10
        t0 = time.perf_counter()
        r = service.generate(seed=3, model="base")
        assert r.status_code == 200, r.text
        after_timeout = time.perf_counter() - t0
    finally:
        service.deploy()
        service.wait_default("base")
    # uncancelled, the slow request holds the model for about 2 x 16 x 120 / 3 = 1280 small requests' steps
    limit = max(5.0, 4 * normal)
    assert after_disconnect < limit and after_timeout < limit, (normal, after_disconnect, after_timeout)


def test_the_openai_client_works_against_the_service(service):
    import openai

    client = openai.OpenAI(base_url=f"{service.http.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    out = client.images.generate(
        model="demo@step_000001", prompt="a lighthouse", n=2, size="64x64", response_format="b64_json"
    )
    assert len(out.data) == 2 and decode_png(out.data[0].b64_json).size == (64, 64)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.images.generate(prompt="a lighthouse", size="1024x1024", response_format="b64_json")
    assert info.value.code == "size_limit" and info.value.param == "height"  # checked first
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="nope", prompt="a", response_format="b64_json")
    assert info.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=f"{service.http.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a", response_format="b64_json")


def test_oversized_bodies_get_413(service):
    big = json.dumps({"prompt": "a", "negative_prompt": "x" * (70 * 1024)}).encode()
    assert_error(service.http.post("/v1/generate", content=big), 413, "body", "64 KiB")

    def chunks():  # no Content-Length: the streamed body is counted
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_error(service.http.post("/v1/generate", content=chunks()), 413, "body", "64 KiB")
    assert service.http.get("/healthz").status_code == 200


def test_overload_answers_503_with_retry_after_and_stays_healthy(service):
    """64 requests at concurrency 16 against a model queue of 4 + 4 in flight: only 200 or 503."""

    def one(i: int) -> httpx.Response:
        return service.http.post(
            "/v1/generate", json={"prompt": f"p{i}", "num_inference_steps": 2, "seed": i}
        )

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(64)))
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 4 and statuses.count(503) >= 1, statuses
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "overloaded"
    assert service.http.get("/healthz").status_code == 200
    assert service.generate(seed=1).status_code == 200


def test_user_config_change_reconfigures_without_restart(service):
    before = service.replicas()
    service.deploy(default_model="demo@step_000001")
    service.wait_default("demo@step_000001")
    assert service.generate(seed=2).json()["model"] == "demo@step_000001"
    assert service.http.get("/v1/models").json()["default"] == "demo@step_000001"
    # a generation slower than request_timeout_s answers 504, and the service stays healthy
    service.deploy(default_model="base", request_timeout_s=0.01)
    service.wait_default("base")
    r = service.generate(seed=3, num_inference_steps=40)
    assert_error(r, 504, None, "request_timeout_s=0.01")
    assert r.headers["retry-after"] == "1"
    service.deploy(default_model="base")
    assert service.http.get("/healthz").status_code == 200
    deadline = time.time() + 60
    while (r := service.generate(seed=3)).status_code != 200:  # the timeout back at 60 s
        assert r.status_code == 504 and time.time() < deadline, r.text
        time.sleep(0.5)
    assert service.replicas() == before  # same replica actors: reconfigured, never restarted


def test_prometheus_metrics(service):
    """Requests by route and status, latency, images generated and batch sizes reach Ray's exporter."""
    service.generate(seed=1)
    wanted = [
        ("ray_scoreaction_requests_total{", 'route="/v1/generate"', 'status="200"'),
        ("ray_scoreaction_requests_total{", 'route="/v1/generate"', 'status="422"'),
        ("ray_scoreaction_requests_total{", 'route="/v1/models"', 'status="401"'),
        ("ray_scoreaction_request_latency_s_bucket{", 'route="/v1/generate"'),
        ("ray_scoreaction_images_generated_total{", 'model="base"'),
        ("ray_scoreaction_batch_size_bucket{", 'deployment="ImageModel"'),
    ]
    deadline = time.time() + 90  # metrics are exported every few seconds
    while True:
        lines = httpx.get(service.metrics_url, timeout=10).text.splitlines()
        missing = [w for w in wanted if not any(all(part in line for part in w) for line in lines)]
        if not missing:
            break
        assert time.time() < deadline, f"metrics never exported: {missing}"
        time.sleep(2)
