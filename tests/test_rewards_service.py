"""The reward service (serve/rewards_app.py) on a local Ray: HTTP and handle scores equal local calls,
bad requests get clear errors, concurrent callers are batched, and a tiny fine-tuning run uses it."""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from scoreaction.config import build_config
from scoreaction.reward_config import RewardConfig
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One Ray + Serve per module: the rewards app at http://127.0.0.1:PORT/rewards, app name 'rewards'."""
    from scoreaction.rewards.clip_models import write_open_clip_folder
    from serve.rewards_app import build_app

    clip_dir = write_open_clip_folder(_tiny_open_clip(1), TINY_OPEN_CLIP, tmp_path_factory.mktemp("clip"))
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}},
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    reward_config = {"device": "cpu", "batch_size": 4, "clip_score": {"weights": str(clip_dir)}}
    serve.run(
        build_app({"rewards": SERVED, "reward_config": reward_config}),
        name="rewards",
        route_prefix="/rewards",
    )
    try:
        yield {"url": f"http://127.0.0.1:{port}/rewards", "reward_config": reward_config}
    finally:
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
        f"{url}/score", json={"reward": "aesthetic", "prompts": ["a"], "images": encode_images(_images(1))}
    )
    assert (
        r.status_code == 400
        and "reward='aesthetic' is not served here; served: jpeg_compressibility" in r.text
    )
    bad = encode_images(_images(1) * 3)
    r = httpx.post(f"{url}/score", json={"reward": "clip_score", "prompts": ["a"], "images": bad})
    assert r.status_code == 400 and "must lie in [0, 1], got values in" in r.text
    r = httpx.post(
        f"{url}/score", json={"reward": "clip_score", "prompts": ["a"], "images": {**bad, "dtype": "uint8"}}
    )
    assert r.status_code == 400 and "images.dtype='uint8'; allowed: 'float32'" in r.text
    with pytest.raises(RewardError, match="does not serve 'pickscore'; it serves: jpeg_compressibility"):
        HttpReward(url, "pickscore")
    with pytest.raises(RewardError, match="does not serve 'hpsv2'"):
        HandleReward("rewards", "hpsv2")
    with pytest.raises(RewardError, match="no running Serve application of that name"):
        HandleReward("no-such-app", "clip_score")
    with pytest.raises(RewardError, match="cannot reach it"):
        HttpReward(f"http://127.0.0.1:{_free_port()}/rewards", "clip_score", timeout_s=5)


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


def test_tiny_finetuning_run_uses_the_service(service, tmp_path, tiny_dir):
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

    local = run("local")
    via_http = run("http", f"reward.service={service['url']}")
    # same seed, same images: the service's scores equal the local ones, so the whole run is identical
    assert via_http["per_epoch"][0]["rollout/reward_mean"] == local["per_epoch"][0]["rollout/reward_mean"]
    assert via_http["final"]["reward_mean"] == local["final"]["reward_mean"]
    assert via_http["final"]["kl_mean"] == local["final"]["kl_mean"]
    assert local["final"]["reward_mean"] > 0  # jpeg kB of the tiny images
