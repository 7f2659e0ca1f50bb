"""The reward service client under faults, against a stand-in service this module controls, and a short
fine-tuning run whose reward service drops connections, stalls and answers 503s for a while.

``FlakyRewardServer`` is a threading HTTP server that speaks the rewards app's wire format (POST /score,
GET /rewards) and misbehaves on a script before it answers properly. Script actions (one per request to the path, then "ok" forever):

- ``ok``: score with ``score_fn`` (default: the in-process reward ``name``) and answer 200;
- ``drop``: read the request, close the connection without answering;
- ``cut``: start a 200 answer, send part of it, close;
- ``stall:S``: hold the connection S seconds without a byte, then close;
- ``503:RA`` / ``502`` / ``504``: that status with the JSON error shape (and ``Retry-After: RA`` if given);
- ``json:TEXT``: answer 200 with TEXT as the body (a malformed or wrong answer).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from scoreaction.config import build_config
from scoreaction.rewards import RewardError
from scoreaction.rewards.service_client import HttpReward, encode_images, retry_after_s
from scoreaction.trainer import Trainer

KEY = "test-reward-key-5f1e"
PROMPTS = ["a cat", "a dog", "a bowl of ramen"]


def decode(images: dict) -> torch.Tensor:
    raw = base64.b64decode(images["data"])
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(images["shape"]).copy())


class FlakyRewardServer:
    def __init__(
        self,
        name: str = "jpeg_incompressibility",
        score: list[str] | None = None,
        rewards: list[str] | None = None,
        score_fn: Callable[[torch.Tensor, list[str]], list[float]] | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        self.name = name
        self.scripts = {"/score": list(score or []), "/rewards": list(rewards or [])}
        self.log: list[tuple[str, str, float]] = []  # (path, action, time)
        self.headers: list[dict[str, str]] = []
        self.max_body_bytes = max_body_bytes
        if score_fn is None:
            from scoreaction.rewards import build_named

            reward = build_named(name)
            score_fn = lambda x, p: reward(x, p).tolist()  # noqa: E731
        self.score_fn = score_fn
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/rewards"

    def actions(self, path: str) -> list[str]:
        return [a for p, a, _ in self.log if p == path]

    def __enter__(self) -> FlakyRewardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next(self, path: str) -> str:
        with self.lock:
            script = self.scripts.get(path, [])
            action = script.pop(0) if script else "ok"
            self.log.append((path, action, time.monotonic()))
            return action

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _act(self, path: str, answer: Callable[[], bytes]) -> None:
                action = server._next(path)
                server.headers.append(dict(self.headers))
                if action == "drop":
                    self.close_connection = True
                    return
                if action.startswith("stall:"):
                    time.sleep(float(action.split(":")[1]))
                    self.close_connection = True
                    return
                if action == "cut":
                    body = answer()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                if action.startswith("json:"):
                    self._send(200, action[5:].encode())
                    return
                code, _, ra = action.partition(":")
                if code.isdigit():
                    error = {
                        "error": {"message": f"scripted {code}", "type": "x", "param": None, "code": None}
                    }
                    self._send(int(code), json.dumps(error).encode(), {"Retry-After": ra} if ra else None)
                    return
                self._send(200, answer())

            def do_GET(self) -> None:
                path = self.path.removeprefix("/rewards") or "/"
                self._act(path, lambda: json.dumps({"rewards": [server.name]}).encode())

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(n)
                if server.max_body_bytes is not None and n > server.max_body_bytes:
                    self._send(413, json.dumps({"error": {"message": f"body {n} > limit"}}).encode())
                    return
                body = json.loads(raw)
                path = self.path.removeprefix("/rewards")

                def answer() -> bytes:
                    images = decode(body["images"])
                    scores = server.score_fn(images, body["prompts"])
                    return json.dumps({"reward": body["reward"], "scores": scores, "info": {}}).encode()

                self._act(path, answer)

        return Handler


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


def _mean_score(x: torch.Tensor, prompts: list[str]) -> list[float]:
    return x.mean(dim=(1, 2, 3)).tolist()


def _client(url: str, **kw) -> HttpReward:
    opts = {"timeout_s": 30.0, "attempt_timeout_s": 0.5, "max_backoff_s": 0.2, **kw}
    return HttpReward(url, "jpeg_incompressibility", **opts)


def test_client_waits_through_drops_stalls_and_503s_then_succeeds(monkeypatch, caplog):
    monkeypatch.setenv("SCOREACTION_API_KEY", KEY)
    script = ["drop", "cut", "stall:3", "502", "503:1", "504", "503:1", "ok"]
    images = _images()
    with FlakyRewardServer(score=script, rewards=["drop", "503:1"], score_fn=_mean_score) as srv:
        with caplog.at_level(logging.WARNING, logger="scoreaction.rewards.service_client"):
            client = _client(srv.url)
            start = time.monotonic()
            scores = client(images, PROMPTS)
            elapsed = time.monotonic() - start
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)), rtol=0, atol=0)
    assert srv.actions("/score") == script  # every scripted failure was retried, the answer came once
    assert srv.actions("/rewards") == ["drop", "503:1", "ok"]  # the client's start retries too
    # Retry-After: 1 was honoured twice (and the stall cost one attempt timeout)
    gaps = [b[2] - a[2] for a, b in zip(srv.log, srv.log[1:], strict=False)]
    assert sum(g >= 0.95 for g in gaps) >= 3, gaps
    assert 2.4 < elapsed < 15, elapsed
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(waits) == len(script) - 1 + 2, waits  # one log line per retry
    assert "waiting 1.0 s for the service" in "\n".join(waits)
    assert all(h.get("Authorization") == f"Bearer {KEY}" for h in srv.headers)
    assert KEY not in caplog.text


def test_client_gives_up_at_the_deadline_with_a_clear_error():
    with FlakyRewardServer(score=["503"] * 1000, score_fn=_mean_score) as srv:
        client = _client(srv.url, timeout_s=2.0)
        start = time.monotonic()
        with pytest.raises(
            RewardError, match=r"no answer within reward.service_timeout_s=2 s .*last: HTTP 503"
        ):
            client(_images(), PROMPTS)
        assert time.monotonic() - start < 3.5
        assert len(srv.actions("/score")) >= 4  # it retried with backoff until the deadline
    # one deadline for the whole call, even when every attempt stalls
    with FlakyRewardServer(score=["stall:5"] * 10, score_fn=_mean_score) as srv:
        client = _client(srv.url, timeout_s=1.5)
        start = time.monotonic()
        with pytest.raises(RewardError, match="no answer within reward.service_timeout_s=1.5 s"):
            client(_images(), PROMPTS)
        assert time.monotonic() - start < 2.5
    # nothing listening at all
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        RewardError, match=r"no answer within .*cannot reach it.*serve run serve/rewards.yaml"
    ):
        _client(f"http://127.0.0.1:{port}/rewards", timeout_s=1.0)


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ('{"scores": [1.0, 2.0]}', "returned 2 scores for 3 images .*expected exactly one score per image"),
        ('{"scores": [1.0, 2.0, 3.0, 4.0]}', "returned 4 scores for 3 images"),
        ('{"scores": [1.0, NaN, null]}', "returned 2 non-finite scores of 3 .*image 1: nan, image 2: null"),
        (
            '{"scores": [1.0, Infinity, "2"]}',
            "returned 2 non-finite scores of 3 .*image 1: inf, image 2: '2'",
        ),
        ('{"nothing": 1}', "returned scores='None' for 3 images"),
        ("[1, 2, 3]", "answered .*not an object"),
        ("not json", "answered 200 with non-JSON"),
    ],
)
def test_client_rejects_a_wrong_answer(answer, match):
    with FlakyRewardServer(score=[f"json:{answer}"], score_fn=_mean_score) as srv:
        client = _client(srv.url)
        with pytest.raises(RewardError, match=f"reward service {srv.url}.*{match}"):
            client(_images(), PROMPTS)
        assert srv.actions("/score") == [f"json:{answer}"]  # not retried: the service answered


def test_client_fails_at_once_on_client_errors_and_splits_on_413(monkeypatch):
    monkeypatch.delenv("SCOREACTION_API_KEY", raising=False)
    with FlakyRewardServer(score=["401"], score_fn=_mean_score) as srv:
        client = _client(srv.url)
        with pytest.raises(RewardError, match=r"HTTP 401 .*\$SCOREACTION_API_KEY .*which is not set here"):
            client(_images(), PROMPTS)
    monkeypatch.setenv("MY_REWARD_KEY", KEY)
    with FlakyRewardServer(score=["403"], score_fn=_mean_score) as srv:
        client = _client(srv.url, api_key_env="MY_REWARD_KEY")
        with pytest.raises(RewardError, match="answered HTTP 403: scripted 403") as err:
            client(_images(), PROMPTS)
        assert KEY not in str(err.value) and srv.headers[-1]["Authorization"] == f"Bearer {KEY}"
    # a batch over the service's body limit is sent in halves; the scores keep their order
    images = _images(8)
    one = len(json.dumps(encode_images(images[:1])))
    with FlakyRewardServer(score_fn=_mean_score, max_body_bytes=3 * one) as srv:
        scores = _client(srv.url)(images, [f"p{i}" for i in range(8)])
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)), rtol=0, atol=0)
    with FlakyRewardServer(score_fn=_mean_score, max_body_bytes=100) as srv:
        with pytest.raises(RewardError, match="one .* image is over its body limit"):
            _client(srv.url)(images[:2], ["a", "b"])


def test_retry_after_header_forms():
    assert retry_after_s("3") == 3.0 and retry_after_s(" 0 ") == 0.0 and retry_after_s(None) is None
    assert retry_after_s("-5") == 0.0 and retry_after_s("soon") is None and retry_after_s("nan") is None
    from email.utils import formatdate

    assert 8 < retry_after_s(formatdate(time.time() + 10, usegmt=True)) <= 10


def _run(tmp_path, out: str, *extra: str) -> dict:
    overrides = [
        "run.epochs=2",
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


@pytest.mark.slow  # two 2-epoch tiny runs: about a minute on 2 idle cores
def test_run_completes_every_epoch_through_a_flaky_reward_service(tmp_path, tiny_dir, caplog):
    """Drops, a cut answer, a stall past the attempt timeout and 503s with Retry-After in both epochs: the run
    pauses, then completes every epoch with exactly the numbers of a run scored in-process."""
    local = _run(tmp_path, "local")
    # the reward is scored twice per epoch here (the rollout, then the final evaluation after epoch 2)
    script = ["drop", "503:1", "stall:3", "ok", "cut", "502", "503:1", "ok"]
    with FlakyRewardServer(score=script, rewards=["drop"]) as srv:
        with caplog.at_level(logging.WARNING, logger="scoreaction.rewards.service_client"):
            flaky = _run(
                tmp_path,
                "flaky",
                f"reward.service={srv.url}",
                "reward.service_attempt_timeout_s=1",
                "reward.service_max_backoff_s=0.2",
            )
        assert srv.actions("/score")[: len(script)] == script
    assert len(flaky["per_epoch"]) == 2 == len(local["per_epoch"])
    for a, b in zip(flaky["per_epoch"], local["per_epoch"], strict=True):
        assert a["rollout/reward_mean"] == b["rollout/reward_mean"]
    assert flaky["final"]["reward_mean"] == local["final"]["reward_mean"]
    assert flaky["final"]["kl_mean"] == local["final"]["kl_mean"]
    assert sum("waiting" in r.getMessage() for r in caplog.records) == 7


def test_handle_client_retries_backpressure_and_timeouts_and_checks_scores(caplog):
    """reward.service=APP_NAME (a DeploymentHandle) gets the same retries, deadline and score checks."""
    from ray.exceptions import GetTimeoutError
    from ray.serve.exceptions import BackPressureError

    from scoreaction.rewards.service_client import HandleReward, RetryPolicy

    class Response:
        def __init__(self, outcome) -> None:
            self.outcome, self.cancelled = outcome, False

        def result(self, timeout_s: float):
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        def cancel(self) -> None:
            self.cancelled = True

    class Handle:  # what serve.get_app_handle returns, scripted
        def __init__(self, outcomes: list) -> None:
            self.outcomes, self.calls = outcomes, 0

            class Method:
                def remote(_, *args):
                    self.calls += 1
                    return Response(self.outcomes.pop(0))

            self.score = Method()

    images = _images()
    good = {"scores": images.mean(dim=(1, 2, 3)), "info": {}}
    client = HandleReward.__new__(HandleReward)
    client.app_name, client.name = "rewards", "jpeg_incompressibility"
    client.policy = RetryPolicy(timeout_s=10, attempt_timeout_s=1, max_backoff_s=0.1)
    client.handle = Handle([BackPressureError(3, 2, 503, 0.3), GetTimeoutError("slow"), good])
    with caplog.at_level(logging.WARNING, logger="scoreaction.rewards.service_client"):
        torch.testing.assert_close(client(images, PROMPTS), good["scores"], rtol=0, atol=0)
    assert client.handle.calls == 3
    assert "overloaded (Request dropped due to backpressure" in caplog.text and "waiting 0.3 s" in caplog.text
    client.handle = Handle([{"scores": torch.tensor([1.0, float("nan"), 2.0]), "info": {}}])
    with pytest.raises(RewardError, match="app 'rewards' returned 1 non-finite scores of 3 .*image 1: nan"):
        client(images, PROMPTS)
    client.policy = RetryPolicy(timeout_s=0.5, attempt_timeout_s=1, max_backoff_s=0.1)
    client.handle = Handle([BackPressureError(3, 2, 503, None)] * 100)
    with pytest.raises(RewardError, match="app 'rewards': no answer within reward.service_timeout_s=0.5 s"):
        client(images, PROMPTS)
