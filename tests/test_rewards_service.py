"""The reward service (serve/rewards.yaml, serve/rewards_app.py) on a local Ray, real Serve, real HTTP:
HTTP and handle scores equal local calls, concurrent callers are batched, a tiny fine-tuning run uses it;
the API key, the body limit, overload (503 + Retry-After) and bad input of every kind (never a 500)."""

from __future__ import annotations

import base64
import copy
import json
import os
import socket
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from scoreaction.config import build_config
from scoreaction.config.reward import RewardConfig
from scoreaction.rewards import RewardError, build_reward
from scoreaction.rewards.service_client import HandleReward, HttpReward, encode_images
from scoreaction.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from tests.test_rewards_models import TINY_OPEN_CLIP, _tiny_open_clip  # noqa: E402

SERVED = ["jpeg_compressibility", "jpeg_incompressibility", "clip_score"]
PROMPTS = ["a cat", "a dog", "a bowl of ramen"]
KEY = "reward-service-test-key-7c1d"
AUTH = {"Authorization": f"Bearer {KEY}"}
# the second app: small limits, a queue of one request
SMALL = {"max_body_bytes": 300_000, "max_images": 8, "max_image_side": 64}
SMALL_SETTINGS = {"max_pending_requests": 1, "retry_after_s": 1, "max_batch_size": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One Ray + Serve per module, deployed from serve/rewards.yaml (as `serve deploy` would) with the test's
    rewards: app 'rewards' at http://127.0.0.1:PORT/rewards, and 'rewards_small' (small limits) beside it.
    Both replicas enforce the API key KEY, which this process's $SCOREACTION_API_KEY holds for the clients."""
    from ray.serve.schema import ServeDeploySchema

    from scoreaction.rewards.clip_models import write_open_clip_folder

    clip_dir = write_open_clip_folder(_tiny_open_clip(1), TINY_OPEN_CLIP, tmp_path_factory.mktemp("clip"))
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    port = _free_port()
    reward_config = {"device": "cpu", "batch_size": 4, "clip_score": {"weights": str(clip_dir)}}
    config = yaml.safe_load((ROOT / "serve" / "rewards.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["runtime_env"] = {
        "env_vars": {"SCOREACTION_API_KEY": KEY, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    }
    app["args"] = {**app["args"], "rewards": SERVED, "reward_config": reward_config}
    deployment = app["deployments"][0]
    del deployment["autoscaling_config"]
    deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 1, "num_gpus": 0})
    small = copy.deepcopy(app)
    small.update(name="rewards_small", route_prefix="/rewards_small")
    small["args"] = {"rewards": ["jpeg_compressibility"], "reward_config": {"device": "cpu"}, **SMALL}
    small["deployments"][0]["user_config"] = dict(small["deployments"][0]["user_config"], **SMALL_SETTINGS)
    config["applications"].append(small)
    old_key = os.environ.get("SCOREACTION_API_KEY")
    os.environ["SCOREACTION_API_KEY"] = KEY
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        client = serve.context._get_global_client()
        client.deploy_apps(ServeDeploySchema.model_validate(config))
        for name in ("rewards", "rewards_small"):
            client._wait_for_application_running(name, timeout_s=600)
        base = f"http://127.0.0.1:{port}"
        yield {"url": f"{base}/rewards", "small": f"{base}/rewards_small", "reward_config": reward_config}
    finally:
        if old_key is None:
            os.environ.pop("SCOREACTION_API_KEY", None)
        else:
            os.environ["SCOREACTION_API_KEY"] = old_key
        serve.shutdown()
        ray.shutdown()


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SERVED)
def test_http_and_handle_equal_local_scores(service, name):
    images = _images()
    local = build_reward(RewardConfig(name=name, **service["reward_config"]))(images, PROMPTS)
    via_http = build_reward(RewardConfig(name=name, service=service["url"]))(images, PROMPTS)
    via_handle = build_reward(RewardConfig(name=name, service="rewards"))(images, PROMPTS)
    assert torch.equal(via_http, local) and torch.equal(via_handle, local)


def test_weighted_sum_through_the_service(service):
    images = _images(seed=1)
    cfg = {"weights": {"jpeg_incompressibility": 2.0, "clip_score": -1.0}, "normalize": "none"}
    local = build_reward(RewardConfig(**cfg, **service["reward_config"])).score(images, PROMPTS)
    remote = build_reward(RewardConfig(**cfg, service=service["url"])).score(images, PROMPTS)
    assert torch.equal(remote.scores, local.scores)
    assert torch.equal(remote.info["clip_score"], local.info["clip_score"])


def test_bad_requests_get_clear_errors(service):
    url = service["url"]
    r = httpx.post(
        f"{url}/score",
        json={"reward": "aesthetic", "prompts": ["a"], "images": encode_images(_images(1))},
        headers=AUTH,
    )
    assert (
        r.status_code == 400
        and "reward='aesthetic' is not served here; served: jpeg_compressibility" in r.text
    )
    bad = encode_images(_images(1) * 3)
    r = httpx.post(
        f"{url}/score", json={"reward": "clip_score", "prompts": ["a"], "images": bad}, headers=AUTH
    )
    assert r.status_code == 400 and "must lie in [0, 1], got values in" in r.text
    r = httpx.post(
        f"{url}/score",
        json={"reward": "clip_score", "prompts": ["a"], "images": {**bad, "dtype": "uint8"}},
        headers=AUTH,
    )
    assert r.status_code == 400 and "images.dtype='uint8'; allowed: 'float32'" in r.text
    with pytest.raises(RewardError, match="does not serve 'pickscore'; it serves: jpeg_compressibility"):
        HttpReward(url, "pickscore")
    with pytest.raises(RewardError, match="does not serve 'hpsv2'"):
        HandleReward("rewards", "hpsv2")
    with pytest.raises(RewardError, match="no running Serve application of that name"):
        HandleReward("no-such-app", "clip_score")
    with pytest.raises(RewardError, match="no answer within reward.service_timeout_s=1 s .*cannot reach it"):
        HttpReward(f"http://127.0.0.1:{_free_port()}/rewards", "clip_score", timeout_s=1)


def test_concurrent_callers_are_batched_and_correct(service):
    client = HttpReward(service["url"], "clip_score")
    handle = serve.get_app_handle("rewards")
    before = handle.stats.remote().result()["batch_sizes"]
    local = build_reward(RewardConfig(name="clip_score", **service["reward_config"]))
    inputs = [_images(2, seed=10 + i) for i in range(8)]
    results: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        results[i] = client(inputs[i], PROMPTS[:2])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        torch.testing.assert_close(results[i], local(inputs[i], PROMPTS[:2]), rtol=0, atol=1e-5)
    after = handle.stats.remote().result()["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    assert sum(k * v for k, v in new.items()) == 8  # every request scored once
    assert max(new) > 1, f"8 concurrent requests were never batched together: {new}"


def test_tiny_finetuning_run_uses_the_service(service, tmp_path, tiny_dir, monkeypatch):
    # tiny_dir: the tiny pipeline is written before the runs, so all runs start from the same RNG state
    def run(out: str, *extra: str) -> dict:
        overrides = [
            "run.epochs=1",
            "run.num_samples=4",
            "sampler.num_steps=2",
            "sampler.batch_size=4",
            "algorithm.micro_batch_size=4",
            "reward.name=jpeg_incompressibility",
            f"run.output_dir={tmp_path / out}",
            *extra,
        ]
        Trainer(build_config("tiny", overrides=overrides)).fit()
        return json.loads((tmp_path / out / "summary.json").read_text())

    def scored() -> int:  # score requests the service has answered so far (one replica)
        sizes = serve.get_app_handle("rewards").stats.remote().result()["batch_sizes"]
        return sum(int(k) * v for k, v in sizes.items())

    def numbers(summary: dict) -> dict:  # everything but timings: a function of the seed and the scores
        return {
            **{k: v for k, v in summary.items() if k != "wall_s"},
            "per_epoch": [
                {k: v for k, v in m.items() if not k.startswith("perf/")} for m in summary["per_epoch"]
            ],
        }

    sent: list[int] = []  # images in each score call the run made through the HTTP client
    http_score = HttpReward._score

    def counting_score(self: HttpReward, images: torch.Tensor, prompts: list[str]):
        sent.append(images.shape[0])
        return http_score(self, images, prompts)

    monkeypatch.setattr(HttpReward, "_score", counting_score)
    before = scored()
    local = run("local")
    assert scored() == before  # the local run scores in-process
    via_http = run("http", f"reward.service={service['url']}")
    # every query the run counted went through the service client: the epoch's 4 images and their 4 x 2 x0_hat
    # priors, and the final evaluation's 4 images (an in-process reward sends none)...
    assert sum(sent) == via_http["reward_queries"] >= 4 * (1 + 2) + 4
    # ...and the service answered each of those calls (one request each: none is over its body limit)
    assert scored() - before == len(sent)
    # same seed, same images: the service's scores equal the local ones, so every number of the run is equal
    assert numbers(via_http) == numbers(local)


def _assert_error(r: httpx.Response, status: int, text: str = "", param: str | None = None) -> dict:
    """The documented error shape: JSON {"error": {message, type, param, code}}, encodable, never a 500."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    assert text in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def _payload(n: int = 2, side: int = 16, **images) -> dict:
    imgs = encode_images(torch.rand((n, 3, side, side), generator=torch.Generator().manual_seed(n)))
    return {"reward": "jpeg_compressibility", "prompts": ["p"] * n, "images": {**imgs, **images}}


def test_api_key_is_required_and_the_client_sends_it(service, monkeypatch):
    for url in (service["url"], service["small"]):
        err = _assert_error(httpx.get(f"{url}/rewards"), 401, "Authorization header missing", "Authorization")
        assert err["code"] == "invalid_api_key"
        r = httpx.post(f"{url}/score", json=_payload(), headers={"Authorization": f"Bearer {KEY}x"})
        _assert_error(r, 401, "Authorization header wrong")
        assert httpx.get(f"{url}/rewards", headers=AUTH).status_code == 200
    # the key is checked before the body limit: a stranger learns nothing about the service
    big = b"x" * (SMALL["max_body_bytes"] + 1)
    _assert_error(httpx.post(f"{service['small']}/score", content=big), 401)
    # the client takes the key from $SCOREACTION_API_KEY or the variable reward.service_api_key_env names
    monkeypatch.delenv("SCOREACTION_API_KEY")
    with pytest.raises(RewardError, match=r"HTTP 401 .*\$SCOREACTION_API_KEY .*is not set here"):
        build_reward(RewardConfig(name="clip_score", service=service["url"]))
    monkeypatch.setenv("OTHER_KEY", KEY + "-wrong")
    with pytest.raises(RewardError, match=r"\$OTHER_KEY .*is set but the service rejects it") as err:
        build_reward(RewardConfig(name="clip_score", service=service["url"], service_api_key_env="OTHER_KEY"))
    assert KEY not in str(err.value)
    monkeypatch.setenv("OTHER_KEY", KEY)
    cfg = RewardConfig(name="jpeg_compressibility", service=service["url"], service_api_key_env="OTHER_KEY")
    assert build_reward(cfg)(_images(), PROMPTS).shape == (3,)


def test_body_limit_answers_413_and_the_client_sends_halves(service):
    small, limit = service["small"], SMALL["max_body_bytes"]
    r = httpx.post(f"{small}/score", content=b"{" + b" " * limit + b"}", headers=AUTH)
    _assert_error(r, 413, f"the limit is {limit} bytes", "body")

    def chunks():  # no Content-Length: the limit counts the streamed body
        for _ in range(limit // 10_000 + 2):
            yield b" " * 10_000

    _assert_error(httpx.post(f"{small}/score", content=chunks(), headers=AUTH), 413, "the limit is")
    # 8 images of 64 px are ~0.5 MB of JSON, over the 300 kB limit: the client sends 4 + 4 and keeps the order
    images = torch.rand((8, 3, 64, 64), generator=torch.Generator().manual_seed(3))
    prompts = [f"p{i}" for i in range(8)]
    remote = HttpReward(small, "jpeg_compressibility", timeout_s=60)(images, prompts)
    local = build_reward(RewardConfig(name="jpeg_compressibility"))(images, prompts)
    assert torch.equal(remote, local)


def test_overload_answers_503_with_retry_after_and_the_client_waits(service):
    """rewards_small holds one request at a time (max_pending_requests=1): a burst gets 200s and 503s with
    Retry-After: 1 and the JSON error shape, never anything else; clients in a burst all get their scores."""
    small = service["small"]
    body = json.dumps(_payload(4, side=64))
    statuses: list[int] = []
    with httpx.Client(headers={**AUTH, "Content-Type": "application/json"}, timeout=60) as http:
        for _ in range(5):  # bursts until the replica was seen busy (the first one nearly always does it)
            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(lambda _: http.post(f"{small}/score", content=body), range(12)))
            statuses += [r.status_code for r in answers]
            for r in answers:
                if r.status_code == 503:
                    err = _assert_error(r, 503, "max_pending_requests")
                    assert err["code"] == "overloaded" and r.headers["retry-after"] == "1"
                else:
                    assert r.status_code == 200 and len(r.json()["scores"]) == 4, r.text
            if 503 in statuses:
                break
    assert set(statuses) == {200, 503}, statuses
    assert serve.get_app_handle("rewards_small").stats.remote().result()["rejected"] >= statuses.count(503)
    client = HttpReward(small, "jpeg_compressibility", timeout_s=120)
    images = [torch.rand((4, 3, 64, 64), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    local = build_reward(RewardConfig(name="jpeg_compressibility"))
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda x: client(x, ["p"] * 4), images))
    for x, got in zip(images, results, strict=True):
        assert torch.equal(got, local(x, ["p"] * 4))


NAN = base64.b64encode(struct.pack("<f", float("nan")) * (3 * 8 * 8)).decode()
BAD_SHAPES = [
    ([-1, 3, 8, 8], 400, "out of range"),
    ([0, 3, 8, 8], 400, "1 <= B <= 8"),
    ([9, 3, 8, 8], 400, "1 <= B <= 8"),
    ([1, 4, 8, 8], 400, "[B, 3, H, W]"),
    ([1, 3, 4, 8], 400, "8 <= H, W <= 64"),
    ([1, 3, 8, 65], 400, "8 <= H, W <= 64"),
    ([1, 3, 10**9, 10**9], 400, "out of range"),
    ([2**62, 3, 2**62, 2**62], 400, "out of range"),
    ([2**64 + 1, 3, 8, 8], 400, "out of range"),
    ([1, 3, 8, 8, 1], 422, "must be a list of 4 integers"),
    ([1, 3, 8], 422, "must be a list of 4 integers"),
    ([1.5, 3, 8, 8], 422, "must be a list of 4 integers"),
    ([True, 3, 8, 8], 422, "must be a list of 4 integers"),
    ([1, 3, "8", 8], 422, "must be a list of 4 integers"),
    ("1,3,8,8", 422, "must be a list of 4 integers"),
    (None, 422, "must be a list of 4 integers"),
    ({"b": 1}, 422, "must be a list of 4 integers"),
    ([1, 3, 16, 16], 400, "needs 3072 bytes"),  # the data holds 2 x 3 x 16 x 16 floats
    ([4, 3, 16, 16], 400, "needs 12288 bytes"),
]


@pytest.mark.parametrize(("shape", "status", "text"), BAD_SHAPES, ids=[str(s[0]) for s in BAD_SHAPES])
def test_absurd_shapes_are_client_errors(service, shape, status, text):
    r = httpx.post(f"{service['small']}/score", content=json.dumps(_payload(shape=shape)), headers=AUTH)
    _assert_error(r, status, text)


BAD_BODIES = [
    (b"{", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),  # nested past the parser's recursion limit
    (b"", 400, "not valid JSON"),
    (b"[]", 422, "must be a JSON object"),
    (b"null", 422, "must be a JSON object"),
    (b'"\\ud800"', 422, "must be a JSON object {reward, prompts, images}, got '\\ud800'"),
    (b'{"reward": "jpeg_compressibility", "prompts": []}', 422, "images is missing"),
]


@pytest.mark.parametrize(("body", "status", "text"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_malformed_bodies_are_client_errors(service, body, status, text):
    _assert_error(httpx.post(f"{service['small']}/score", content=body, headers=AUTH), status, text)


BAD_FIELDS = [
    ({"reward": 1}, 422, "reward=1 must be a string", "reward"),
    ({"reward": None}, 422, "reward=None must be a string", "reward"),
    ({"reward": "\ud800"}, 400, "reward='\\ud800' is not served here", None),
    (
        {"reward": "aesthetic"},
        400,
        "reward='aesthetic' is not served here; served: jpeg_compressibility",
        None,
    ),
    ({"\ud800": 1}, 422, "unknown keys ['\\ud800']", "body"),
    ({"prompts": "p"}, 422, "prompts='p' must be a list of strings", "prompts"),
    ({"prompts": ["p", 3]}, 422, "prompts[1]=3 must be a string", "prompts.1"),
    (
        {"prompts": ["p", "a\ud800b"]},
        422,
        "prompts[1]='a\\ud800b' holds a lone UTF-16 surrogate",
        "prompts.1",
    ),
    ({"prompts": ["p"]}, 400, "prompts has 1 strings for 2 images", "prompts"),
    ({"prompts": ["p", "x" * 10_001]}, 422, "prompts[1] has 10001 characters; at most 10000", "prompts.1"),
    ({"images": "abc"}, 422, "images='abc': must be an object", "images"),
    ({"images": {"dtype": "float32", "shape": [2, 3, 16, 16]}}, 422, "images.data is missing", "images.data"),
]
BAD_IMAGES = [
    ({"dtype": "float64"}, 400, "images.dtype='float64'; allowed: 'float32'"),
    ({"dtype": "\ud800"}, 400, "images.dtype='\\ud800'"),
    ({"dtype": None}, 400, "images.dtype=None"),
    ({"data": 12}, 422, "images.data must be a base64 string, got int"),
    ({"data": "!" * 8192}, 400, "images.data is not valid base64"),
    ({"data": "\ud800" * 8192}, 400, "images.data is not valid base64"),
    ({"data": "AAAA"}, 400, "images.data holds 4 base64 characters"),
    ({"extra": 1}, 422, "images has unknown keys ['extra']"),
    ({"shape": [1, 3, 8, 8], "data": NAN}, 400, "must lie in [0, 1], got values in [nan, nan]"),
]


@pytest.mark.parametrize(("fields", "status", "text", "param"), BAD_FIELDS, ids=range(len(BAD_FIELDS)))
def test_bad_fields_are_client_errors_that_encode(service, fields, status, text, param):
    body = {**_payload(), **fields}
    r = httpx.post(f"{service['small']}/score", content=json.dumps(body), headers=AUTH)
    _assert_error(r, status, text, param)


@pytest.mark.parametrize(("images", "status", "text"), BAD_IMAGES, ids=range(len(BAD_IMAGES)))
def test_bad_image_payloads_are_client_errors(service, images, status, text):
    body = _payload(**images)
    if "shape" in images:
        body["prompts"] = ["p"] * images["shape"][0]
    r = httpx.post(f"{service['small']}/score", content=json.dumps(body), headers=AUTH)
    _assert_error(r, status, text)


def test_unknown_routes_and_methods_answer_json(service):
    small = service["small"]
    _assert_error(httpx.get(f"{small}/nope", headers=AUTH), 404, "routes: POST /score, GET /rewards")
    _assert_error(httpx.get(f"{small}/score", headers=AUTH), 405, "method GET is not allowed")
    # after all the bad input the service still scores
    r = httpx.post(f"{small}/score", content=json.dumps(_payload()), headers=AUTH)
    assert r.status_code == 200 and len(r.json()["scores"]) == 2
