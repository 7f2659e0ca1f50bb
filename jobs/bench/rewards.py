"""Suite `rewards`: reward throughput in-process vs through a Ray actor vs through the reward service.

For JPEG compressibility and a tiny open_clip CLIP score (32 px ViT, 2 layers: the model is small so the
numbers show the transport and batching overheads, not model compute), batch 16 of 64x64 images:

- in-process: ``build_reward(cfg)(images, prompts)`` (the baseline of every row);
- reward actor: one Ray actor holding the same reward, ``ray.get(actor.score.remote(images, prompts))``.
  A minimal stand-in for the distributed issue's RewardWorker (not built yet);
- service: the rewards app (serve/rewards_app.py) over HTTP and through a DeploymentHandle.

And the service's batching gain: 8 concurrent HTTP callers x 4 images each, images/s with dynamic batching
(max_batch_size 16) over the same app with max_batch_size 1.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import Result, interleaved_median, result
from scoreaction.config.reward import RewardConfig
from scoreaction.rewards import build_reward

ROOT = Path(__file__).resolve().parents[2]
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
BATCH, CALLERS, PER_CALLER = 16, 8, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_clip_dir() -> Path:
    from open_clip.model import CLIP

    from scoreaction.rewards.clip_models import write_open_clip_folder

    torch.manual_seed(0)
    return write_open_clip_folder(
        CLIP(**TINY_OPEN_CLIP), TINY_OPEN_CLIP, tempfile.mkdtemp(prefix="bench-clip-")
    )


def _concurrent(client, images: list[torch.Tensor], prompts: list[str]) -> float:
    """Seconds for CALLERS threads to score their images at once through client."""
    threads = [threading.Thread(target=client, args=(x, prompts)) for x in images]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run(repeats: int) -> list[Result]:
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT))
    from scoreaction.rewards.service_client import HttpReward
    from serve.rewards_app import RewardServer, build_app

    reward_config = {"device": "cpu", "batch_size": BATCH, "clip_score": {"weights": str(_tiny_clip_dir())}}
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    names = ["jpeg_compressibility", "clip_score"]
    try:
        args = {"rewards": names, "reward_config": reward_config}
        serve.run(build_app(args), name="rewards", route_prefix="/rewards")
        nobatch = RewardServer.options(user_config={"max_batch_size": 1}).bind(names, reward_config)
        serve.run(nobatch, name="rewards_nobatch", route_prefix="/rewards_nobatch")

        @ray.remote(num_cpus=1)
        class RewardActor:  # stand-in for the distributed issue's RewardWorker
            def __init__(self, cfg: dict) -> None:
                self.fn = build_reward(RewardConfig.model_validate(cfg))

            def score(self, images, prompts):
                return self.fn(images, prompts)

        g = torch.Generator().manual_seed(0)
        images = torch.rand((BATCH, 3, 64, 64), generator=g)
        prompts = ["a photo of a cat"] * BATCH
        results: list[Result] = []
        for name in names:
            cfg = RewardConfig(name=name, **reward_config)
            local = build_reward(cfg)
            actor = RewardActor.remote(cfg.model_dump())
            http = build_reward(cfg.model_copy(update={"service": f"{url}/rewards"}))
            handle = build_reward(cfg.model_copy(update={"service": "rewards"}))
            fns = {
                "in_process": lambda local=local: local(images, prompts),
                "actor": lambda actor=actor: ray.get(actor.score.remote(images, prompts)),
                "service_http": lambda http=http: http(images, prompts),
                "service_handle": lambda handle=handle: handle(images, prompts),
            }
            med = interleaved_median(fns, repeats)
            base = BATCH / med["in_process"]
            results.append(
                result(f"rewards/{name}/b{BATCH}/in_process_images_per_s", base, "img/s", base, "-")
            )
            for k in ("actor", "service_http", "service_handle"):
                label = "reward_actor(stand-in)" if k == "actor" else k
                results.append(
                    result(
                        f"rewards/{name}/b{BATCH}/{label}_images_per_s",
                        BATCH / med[k],
                        "img/s",
                        base,
                        "report",
                    )
                )
            ray.kill(actor)

        batched = HttpReward(f"{url}/rewards", "clip_score")
        unbatched = HttpReward(f"{url}/rewards_nobatch", "clip_score")
        calls = [torch.rand((PER_CALLER, 3, 64, 64), generator=g) for _ in range(CALLERS)]
        cp = ["a photo of a cat"] * PER_CALLER
        med = interleaved_median(
            {
                "batched": lambda: _concurrent(batched, calls, cp),
                "unbatched": lambda: _concurrent(unbatched, calls, cp),
            },
            repeats,
        )
        n = CALLERS * PER_CALLER
        results.append(
            result(
                f"rewards/service/clip_score/{CALLERS}_callers_x{PER_CALLER}/batched_images_per_s",
                n / med["batched"],
                "img/s",
                n / med["unbatched"],
                "> 1",
            )
        )
        stats = serve.get_app_handle("rewards").stats.remote().result()
        print(f"rewards suite: requests per @serve.batch call (batched app): {stats['batch_sizes']}")
        return results
    finally:
        serve.shutdown()
        ray.shutdown()
