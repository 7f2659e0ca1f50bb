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
        d["user_config"] = dict(d["user_config"], checkpoint_root=str(root), max_batch_size=4)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        svc = Service(config, root, port, policy)
        svc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        svc.deploy()
        yield svc
    finally:
        serve.shutdown()
        ray.shutdown()


def assert_error(r: httpx.Response, status: int, param: str | None = None, text: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
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
]


@pytest.mark.parametrize("body,status,param,text", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_clear_json_error(service, body, status, param, text):
    if isinstance(body, bytes):
        r = service.http.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    else:
        r = service.http.post("/v1/generate", json=body)
    err = assert_error(r, status, param, text)
    if status == 422:
        assert err["errors"][0]["field"] == param and "value" in err["errors"][0]


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
