"""Suite `serve`: the image service on `tiny` over real HTTP (local Ray + Serve on a free loopback port).

- Batching gain: images/s of 8 concurrent requests over 8 sequential ones (target >= 2x).
- Serving overhead: latency of one request through HTTP over one direct in-process ``ImageGenerator`` call
  (same model, chunk, steps and thread count), and where the difference goes: the batch wait
  (``batch_wait_timeout_s``), ingress -> model replica (Ray handle, multiplexing, PNG bytes back), and
  proxy + HTTP + JSON/base64 outside the ingress.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from bench.common import Result, interleaved_median, result

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
CONCURRENCY = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(threads: int) -> str:
    import ray
    from ray import serve

    sys.path.insert(0, str(REPO))
    from serve.app import ImageModel, Ingress

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}},
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"max_batch_size": CONCURRENCY, "batch_wait_timeout_s": 0.05, "request_timeout_s": 600}
    model = ImageModel.options(user_config=settings, max_ongoing_requests=2 * CONCURRENCY).bind(
        {"base_model": {"preset": "tiny", "device": "cpu"}, "chunk": 4, "torch_threads": threads}
    )
    serve.run(Ingress.options(user_config=settings).bind(model), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def run(repeats: int) -> list[Result]:
    import ray
    from ray import serve

    from scoreaction.config import ModelConfig
    from scoreaction.serving.generate import ImageGenerator, LoadedModel
    from scoreaction.serving.spec import GenerationSpec

    # One torch thread on both sides. With 2 threads per process on a shared 2-core machine, OpenMP's
    # barrier waits dominate once Ray's processes run beside the driver (measured: 2.5 s -> 27-70 s for one
    # direct call after ray.init, 0.4-0.7 s with 1 thread). Ray gives a 1-CPU replica 1 thread anyway.
    threads = 1
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    url = _start(threads)
    client = httpx.Client(base_url=url, timeout=600)
    counter = iter(range(10**9))

    def post(seed: int) -> dict:
        r = client.post(
            "/v1/generate", json={"prompt": "a photo of a cat", "num_inference_steps": STEPS, "seed": seed}
        )
        r.raise_for_status()
        return r.json()

    def sequential() -> None:
        for _ in range(CONCURRENCY):
            post(next(counter))

    pool = ThreadPoolExecutor(CONCURRENCY)

    def concurrent() -> None:
        seeds = [next(counter) for _ in range(CONCURRENCY)]
        list(pool.map(post, seeds))

    results: list[Result] = []
    try:
        med = interleaved_median({"sequential": sequential, "concurrent": concurrent}, repeats)
        seq_ips, conc_ips = CONCURRENCY / med["sequential"], CONCURRENCY / med["concurrent"]
        results.append(
            result(
                f"serve/tiny/batching/{CONCURRENCY}_concurrent_vs_sequential/images_per_s",
                conc_ips,
                "img/s",
                seq_ips,
                ">= 2",
            )
        )

        generator = ImageGenerator.from_config(ModelConfig(preset="tiny", device="cpu"), chunk=4)
        base = LoadedModel("base")
        timings: list[dict] = []

        def http_one() -> None:
            t0 = time.perf_counter()
            body = post(next(counter))
            body["timings"]["client_ms"] = (time.perf_counter() - t0) * 1000
            timings.append(body["timings"])

        def direct_one() -> None:
            spec = GenerationSpec(prompt="a photo of a cat", seed=next(counter), num_inference_steps=STEPS)
            generator.generate(base, [spec])

        med = interleaved_median({"http": http_one, "direct": direct_one}, repeats)
        results.append(
            result(
                f"serve/tiny/overhead/one_request_n{STEPS}/latency_http_over_direct",
                med["http"] * 1000,
                "ms",
                med["direct"] * 1000,
                "report",
            )
        )

        def part(fn) -> float:
            return statistics.median(fn(t) for t in timings)

        breakdown = {
            "model_replica_generate": part(lambda t: t["generate_ms"]),
            "batch_wait_in_replica": part(lambda t: t["queue_ms"]),
            "ingress_to_replica_and_back": part(lambda t: t["total_ms"] - t["generate_ms"] - t["queue_ms"]),
            "proxy_http_json_outside_ingress": part(lambda t: t["client_ms"] - t["total_ms"]),
        }
        for name, ms in breakdown.items():
            results.append(
                result(f"serve/tiny/overhead/breakdown/{name}", ms, "ms", med["http"] * 1000, "report")
            )
    finally:
        pool.shutdown()
        serve.shutdown()
        ray.shutdown()
        torch.set_num_threads(saved_threads)
    return results
