"""End to end exactly as a user runs it: a real head (`ray start --head` on loopback, ports picked free, its
own temp dir), then `ray job submit --working-dir . -- python jobs/finetune.py --preset tiny ...` through
the CLI, waiting for SUCCEEDED; checks the checkpoint, summary.json and the reward. The head is stopped by
its own process group only (a bare `ray stop` would stop other people's Ray too)."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    proc: subprocess.Popen
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    env: dict

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        """SIGTERM the `ray start --block` process group (it stops its Ray processes), then SIGKILL."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 6, timeout_s: float = 180.0, resources: str | None = None) -> Head:
    # short path: Ray's Unix sockets live under it (108-byte limit)
    temp_dir = tempfile.mkdtemp(prefix="sa-rayhead-", dir="/tmp")
    port, dash = free_port(), free_port()
    lo = random.randrange(20000, 32000, 1000)  # below the ephemeral range that free_port() draws from
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is the venv's
    # token auth with this head's own token (not ~/.ray/auth_token): the CLI, the head and the job share it
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 999}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
    ]
    if resources:
        cmd.append(f"--resources={resources}")
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - lives as long as the head
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = (Path(temp_dir) / "ray-start.log").read_text()
            head.stop()
            raise RuntimeError(f"ray start --head exited with {proc.returncode}:\n{text[-3000:]}")
        if head.ray("job", "list", "--address", head.dashboard_url, timeout=60).returncode == 0:
            return head
        time.sleep(2)
    head.stop()
    raise RuntimeError(f"the Ray head did not answer at {head.dashboard_url} within {timeout_s:g} s")


@pytest.fixture(scope="module")
def head():
    h = start_head(num_cpus=6)
    yield h
    h.stop()


def _submit(head: Head, out: Path, preset: str, *args: str) -> dict:
    job_id = f"scoreaction-test-{preset}-{os.getpid()}"
    submit = head.ray(
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--working-dir",
        str(ROOT),
        "--submission-id",
        job_id,
        "--",
        "python",
        "jobs/finetune.py",
        "--preset",
        preset,
        "--output-dir",
        str(out),
        *args,
        timeout=900,
    )
    status = head.ray("job", "status", "--address", head.dashboard_url, job_id)
    assert "succeeded" in status.stdout.lower(), (
        f"{status.stdout}\n{submit.stdout[-6000:]}\n{submit.stderr[-3000:]}"
    )
    return json.loads((out / "summary.json").read_text())


def test_ray_job_submit_tiny_writes_checkpoint_summary_grids_and_tensorboard(head, tmp_path):
    """The product path: SD pipeline, LoRA, 2 rollout workers, the tiny preset's hyper-parameters."""
    out = tmp_path / "run"
    epochs = 3
    summary = _submit(
        head,
        out,
        "tiny",
        "--set",
        f"run.epochs={epochs}",
        "--set",
        "run.num_samples=16",
        "--set",
        "sampler.num_steps=8",
        "--set",
        "sampler.batch_size=8",
        "--set",
        "resources.num_rollout_workers=2",
    )
    assert [m["epoch"] for m in summary["per_epoch"]] == list(range(epochs)) and summary[
        "samples"
    ] == 16 * epochs
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{epochs:06d}"
    assert (out / "checkpoints" / f"step_{epochs:06d}" / "pytorch_lora_weights.safetensors").is_file()
    assert summary["distributed"]["checkpoint"] == str(out / "checkpoints" / f"step_{epochs:06d}")
    assert (out / "reward_curve.png").stat().st_size > 0
    assert (out / "samples" / "grid_epoch0000.png").is_file() and (
        out / "samples" / "grid_final.png"
    ).is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert set(summary["final"]) >= {"reward_mean", "kl_mean", "objective"}


@pytest.mark.slow  # minutes on 2 cores: the default suite must stay under 15 min
def test_ray_job_submit_reward_rises(head, tmp_path):
    """A rising reward through the same job path in the default suite: toy-gmm rises within a few cheap
    epochs; the tiny preset's rise needs its full 8 epochs (the slow test below)."""
    summary = _submit(
        head,
        tmp_path / "run",
        "toy-gmm",
        "--set",
        "run.epochs=6",
        "--set",
        "run.num_samples=1024",
        "--set",
        "sampler.batch_size=256",
        "--set",
        "algorithm.micro_batch_size=256",
        "--set",
        "algorithm.learning_rate=3e-3",
    )
    rewards = [m["rollout/reward_mean"] for m in summary["per_epoch"]]
    # E_pre[r] = 0; the mean of the last two epochs well above the first two
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.3, rewards
    assert summary["final"]["reward_mean"] > 0.5


@pytest.mark.slow
def test_ray_job_submit_tiny_preset_raises_jpeg_compressibility(head, tmp_path):
    """The tiny preset as `make demo` runs it (8 epochs x 32 samples x 20 steps), through `ray job submit`:
    the rise that tests/test_tiny_rise.py asks of the single-process loop."""
    summary = _submit(head, tmp_path / "run", "tiny")
    curve = [m["rollout/reward_mean"] for m in summary["per_epoch"]]
    print(
        f"\ndistributed tiny: rollout reward per epoch {curve}, final {summary['final']['reward_mean']:.4f}"
    )
    assert summary["final"]["reward_mean"] - curve[0] > 0.06
    assert min(curve[-2:]) > curve[0]
