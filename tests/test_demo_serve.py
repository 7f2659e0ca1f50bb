"""`make demo` then `make serve`: the image service serves the run the demo wrote.

The run is the Makefile's own demo command (`jobs/finetune.py --preset tiny --output-dir outputs/demo`), cut
to two short epochs and written into a temporary outputs/ folder. The service reads that folder the way
`make serve` does (serve/config.yaml, whose `checkpoint_root` is the folder above the demo's): the slow test
runs the Makefile's serve command (`serve run` on a copy of serve/config.yaml that changes only the runs
folder and the port) and asks it over HTTP; the fast one runs the demo in one process (`--single-process`)
and builds the model replica's parts in-process from the same config.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the serve/ package at the repo root
SHORT = {  # two epochs of four samples at four denoising steps: a real run, in seconds rather than minutes
    "run.epochs": 2,
    "run.num_samples": 4,
    "sampler.num_steps": 4,
    "sampler.batch_size": 4,
    "algorithm.micro_batch_size": 4,
    "reward.batch_size": 4,
}
PROMPT, SEED, WIDTH, HEIGHT, STEPS = "a photo of a cat", 7, 64, 48, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def makefile() -> tuple[dict[str, str], dict[str, list[str]]]:
    """The Makefile's variables (NAME ?= / := VALUE) and each target's recipe lines."""
    variables, recipes, target = {}, {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        if m := re.fullmatch(r"([A-Z_]+)\s*(?:\?=|:=|=)\s*(.*?)\s*", line):
            variables[m.group(1)] = m.group(2)
        elif m := re.match(r"([a-z][a-z-]*):", line):
            target = m.group(1)
            recipes[target] = []
        elif line.startswith("\t") and target is not None:
            recipes[target].append(line.strip())
    return variables, recipes


def recipe_args(target: str, program: str) -> list[str]:
    """The arguments after `program` in the target's recipe, with the Makefile's variables expanded."""
    variables, recipes = makefile()
    for line in recipes[target]:
        words = shlex.split(re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line))
        if program in words:
            return words[words.index(program) + 1 :]
    raise AssertionError(f"`make {target}` no longer runs {program}: {recipes[target]}")


def serve_config() -> dict:
    """serve/config.yaml, the file `make serve` runs."""
    assert recipe_args("serve", "run") == ["serve/config.yaml"]
    return yaml.safe_load((REPO / "serve" / "config.yaml").read_text())


def make_demo(outputs: Path, *extra: str) -> Path:
    """`make demo`'s finetune command with --output-dir moved under `outputs` and the SHORT overrides."""
    variables, _ = makefile()
    args = recipe_args("demo", "jobs/finetune.py")
    demo_dir = Path(variables["DEMO_DIR"])
    run = outputs / demo_dir.relative_to(demo_dir.parts[0])  # outputs/demo -> <outputs>/demo
    i = args.index("--output-dir")
    assert Path(args[i + 1]) == demo_dir
    args[i + 1] = str(run)
    sets = [a for k, v in SHORT.items() for a in ("--set", f"{k}={v}")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # conftest's SCOREACTION_CACHE is kept
    proc = subprocess.run(
        [sys.executable, "jobs/finetune.py", *args, *sets, *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"make demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return run


def final_checkpoint(run: Path) -> str:
    """The model id of the run's final checkpoint: what its `latest` names, at step run.epochs."""
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{SHORT['run.epochs']:06d}", latest
    return f"{run.name}@{latest}"


def check_listing(models: list[dict], run: Path) -> None:
    """The run and its final checkpoint are listed, with the run's step and final reward."""
    ids = {m["id"]: m for m in models}
    final = final_checkpoint(run)
    assert ids[run.name]["kind"] == "run" and ids[run.name]["alias_of"] == final, ids.get(run.name)
    assert ids[final].get("available", True) and ids[final]["step"] == SHORT["run.epochs"], ids[final]
    summary = json.loads((run / "summary.json").read_text())
    assert ids[run.name]["reward"] == pytest.approx(summary["final"]["reward_mean"])


def check_png(data: bytes) -> None:
    assert data[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (WIDTH, HEIGHT)


class Replica:
    """The model replica of serve/config.yaml with its runs folder moved to `checkpoint_root`, in-process and
    on one thread (what Ray gives a 1-CPU replica)."""

    def __init__(self, checkpoint_root: Path) -> None:
        from scoreaction.serving.catalog import CheckpointCatalog
        from scoreaction.serving.generate import ImageGenerator
        from serve.settings import ModelArgs, ServeSettings

        config = serve_config()["applications"][0]
        user_config = config["deployments"][1]["user_config"]
        settings = ServeSettings.model_validate(dict(user_config, checkpoint_root=str(checkpoint_root)))
        args = ModelArgs.model_validate(config["args"])
        self.catalog = CheckpointCatalog(settings.root())
        self.generator = ImageGenerator.from_config(args.base_model, chunk=args.chunk)

    def generate(self, model: str) -> tuple[str, bytes]:
        """The concrete model id `model` resolves to, and its PNG for the test's request."""
        from scoreaction.serving.spec import GenerationSpec

        resolved = self.catalog.resolve(model)
        spec = GenerationSpec(
            prompt=PROMPT,
            seed=SEED,
            num_inference_steps=STEPS,
            height=HEIGHT,
            width=WIDTH,
            guidance_scale=7.5,
        )
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            loaded = self.generator.load(resolved.key, resolved.path, resolved.id)
            (png,) = self.generator.generate(loaded, [spec])[0]
            loaded.unload()
        finally:
            torch.set_num_threads(saved)
        return resolved.id, png


def test_the_demo_folder_is_under_the_services_runs_folder():
    """`make serve` reads serve/config.yaml's checkpoint_root; `make demo` writes DEMO_DIR inside it."""
    from serve.settings import PROJECT_ROOT, ServeSettings

    variables, _ = makefile()
    user_config = serve_config()["applications"][0]["deployments"][0]["user_config"]
    root = ServeSettings.model_validate(user_config).root()
    assert PROJECT_ROOT == REPO
    assert (REPO / variables["DEMO_DIR"]).parent == root, (variables["DEMO_DIR"], root)


def test_the_single_process_demo_is_served_by_the_model_replica(tmp_path):
    """`--single-process` demo run -> the catalog and the model replica of serve/config.yaml, in-process."""
    outputs = tmp_path / "outputs"
    run = make_demo(outputs, "--single-process")
    from scoreaction.serving.catalog import CheckpointCatalog

    check_listing(CheckpointCatalog(outputs).list_models(), run)
    replica = Replica(outputs)
    model, png = replica.generate(run.name)
    assert model == final_checkpoint(run)
    check_png(png)
    assert png != replica.generate("base")[1]  # the run's weights, not the base model's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_make_demo_then_make_serve_serves_the_run_the_demo_wrote(tmp_path):
    """The demo on its default (Ray) path, then `serve run` as `make serve` runs it, over HTTP."""
    outputs = tmp_path / "outputs"
    run = make_demo(outputs)
    config = serve_config()
    port = free_port()
    config["http_options"]["port"] = port
    for deployment in config["applications"][0]["deployments"]:
        deployment["user_config"]["checkpoint_root"] = str(outputs)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("SCOREACTION_API_KEY", None)
    log = (tmp_path / "serve.log").open("w")
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen(
        [str(serve_bin), "run", str(config_file)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped below with everything it started
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the service did not come up within 600 s"
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        listing = http.get("/v1/models")
        assert listing.status_code == 200, listing.text
        check_listing(listing.json()["data"], run)

        def generate(model: str) -> httpx.Response:
            body = {"prompt": PROMPT, "seed": SEED, "num_inference_steps": STEPS, "model": model}
            r = http.post(
                "/v1/generate", json=dict(body, width=WIDTH, height=HEIGHT), headers={"Accept": "image/png"}
            )
            assert r.status_code == 200, r.text
            return r

        served = generate(run.name)
        assert served.headers["X-Model"] == final_checkpoint(run)
        check_png(served.content)
        assert served.content != generate("base").content
        # the bytes the model replica computes from the run's final checkpoint folder
        assert served.content == Replica(outputs).generate(run.name)[1]
    finally:
        http.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve and its Ray down on Ctrl-C
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
