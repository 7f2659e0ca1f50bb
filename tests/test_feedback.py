"""Preferences: the store (SQLite here; tests/test_feedback_postgres.py runs the same checks on PostgreSQL)
and the HTTP routes (POST/GET /v1/preferences, /playground) on the Ray-free app of serve/feedback_local.py,
which mounts the same router, guard and error handlers as the Ray ingress. Generation is the tiny preset
at 2 steps."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora
from fastapi.testclient import TestClient

from scoreaction.checkpoint import save_run_checkpoint
from scoreaction.config import ModelConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.serving.feedback_store import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    FeedbackStore,
    FeedbackStoreError,
    resolve_database_url,
    schema_table,
)
from scoreaction.serving.generate import ImageGenerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serve/ package at the repo root
from serve.feedback_local import build_local_app  # noqa: E402
from serve.settings import ServeSettings  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
PARAMS = {"num_inference_steps": 2, "guidance_scale": 2.0, "eta": 1.0}


@pytest.fixture(scope="module")
def generator(tiny_dir):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ImageGenerator(
        DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir))), 1
    )
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_dir):
    """One run ('tuned') with a random LoRA, so its images differ from the base model's."""
    root = tmp_path_factory.mktemp("outputs")
    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    randomize_lora(policy, seed=3)
    save_run_checkpoint(policy, root / "tuned", 5, metrics={"rollout/reward_mean": 1.0})
    return root


def make_client(generator, root: Path, url: str) -> TestClient:
    settings = ServeSettings.model_validate({"checkpoint_root": str(root), "feedback": {"database_url": url}})
    app, _ = build_local_app(generator, settings, root=root)
    return TestClient(app, raise_server_exceptions=False)


def pref(choice: str = "a", seed_a: int = 1, seed_b: int = 2, model_a="base", model_b="tuned", **kw) -> dict:
    body = {
        "prompt": "a red square",
        "a": {"model": model_a, "seed": seed_a},
        "b": {"model": model_b, "seed": seed_b},
        "choice": choice,
        **PARAMS,
    }
    body.update(kw)
    return body


def lines(r) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(x) for x in r.text.splitlines()]


def assert_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err) and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------------------------------
# Checks shared with the PostgreSQL test (each takes a database URL)
# --------------------------------------------------------------------------------------------------


def check_store_round_trip(url: str) -> None:
    """add -> get/page/count; commit per add: a second store on the same URL (a restart) sees every row."""
    store = FeedbackStore(url)
    start = store.count()
    ids = [
        store.add(
            prompt=f"p{i}",
            model_a="base",
            model_b="run",
            checkpoint_a="base",
            checkpoint_b="run@step_000001",
            seed_a=i,
            seed_b=2**63 - 1,  # the largest seed the API takes fits the column
            image_a=PNG + bytes([i]),
            image_b=PNG + b"b",
            choice=("a", "b", "tie", "both_bad")[i % 4],
            height=64,
            width=64,
            num_inference_steps=20,
            guidance_scale=7.5,
            eta=1.0,
            rater="r1" if i % 2 else None,
        )
        for i in range(5)
    ]
    assert ids == sorted(ids) and len(set(ids)) == 5
    store.close()
    again = FeedbackStore(url)  # a restarted service
    assert again.count() == start + 5
    rows = again.page(after=ids[1], limit=2)
    assert [r["id"] for r in rows] == ids[2:4]
    got = again.get(ids[3])
    assert got["image_a"] == PNG + b"\x03" and got["seed_b"] == 2**63 - 1 and got["choice"] == "both_bad"
    assert got["sha256_a"] == hashlib.sha256(PNG + b"\x03").hexdigest() and got["rater"] == "r1"
    assert [r["id"] for r in again.iter_all(batch=2)][-5:] == ids
    with pytest.raises(ValueError, match="choice='best' is not allowed; allowed: a, b, tie, both_bad"):
        again.add(**{**{k: got[k] for k in got if k not in ("id", "sha256_a", "sha256_b")}, "choice": "best"})
    again.close()


def check_schema_version(url: str) -> None:
    """The version row is written once; a database from newer code is refused with both versions named."""
    store = FeedbackStore(url)
    assert store.version == SCHEMA_VERSION
    with store.engine.begin() as conn:
        conn.execute(
            schema_table.update().where(schema_table.c.name == SCHEMA_NAME).values(version=SCHEMA_VERSION + 1)
        )
    store.close()
    with pytest.raises(FeedbackStoreError, match=f"schema version {SCHEMA_VERSION + 1}; this code reads"):
        FeedbackStore(url)
    store = FeedbackStore.__new__(FeedbackStore)  # put it back for the other checks on this database
    from scoreaction.serving.feedback_store import _engine

    store.url, store.engine = resolve_database_url(url), _engine(resolve_database_url(url))
    with store.engine.begin() as conn:
        conn.execute(
            schema_table.update().where(schema_table.c.name == SCHEMA_NAME).values(version=SCHEMA_VERSION)
        )
    store.close()


def check_api(client: TestClient, fresh_client) -> None:
    """Store through HTTP, export with paging, images byte-equal to /v1/generate's, a restart keeps all."""
    before = int(client.get("/v1/preferences?limit=0").headers["X-Total-Count"])
    shown = client.post(
        "/v1/generate", json={"prompt": "a red square", "model": "tuned", "seed": 9, **PARAMS}
    )
    assert shown.status_code == 200, shown.text
    png_shown = base64.b64decode(shown.json()["images"][0]["b64_png"])
    r = client.post("/v1/preferences", json=pref("b", seed_a=9, seed_b=9, rater="alice"))
    assert r.status_code == 201, r.text
    stored = r.json()
    assert stored["count"] == before + 1
    assert stored["a"]["checkpoint"] == "base" and stored["b"]["checkpoint"] == "tuned@step_000005"
    assert stored["b"]["sha256"] == hashlib.sha256(png_shown).hexdigest()
    for i, choice in enumerate(["a", "tie", "both_bad", "a"]):
        assert client.post("/v1/preferences", json=pref(choice, seed_a=i, seed_b=i + 100)).status_code == 201
    # export, 2 per page: the cursor walks every new row once, oldest first
    seen, after = [], before and int(client.get(f"/v1/preferences?limit={before}").headers["X-Next-After"])
    while True:
        r = client.get(f"/v1/preferences?after={after}&limit=2&images=true")
        page = lines(r)
        assert int(r.headers["X-Total-Count"]) == before + 5
        seen += page
        if "X-Next-After" not in r.headers:
            break
        after = int(r.headers["X-Next-After"])
        assert after == page[-1]["id"] and len(page) == 2
    assert [x["choice"] for x in seen] == ["b", "a", "tie", "both_bad", "a"]
    first = seen[0]
    assert first["rater"] == "alice" and first["params"] == {"height": 64, "width": 64, **PARAMS}
    assert first["a"] == {**stored["a"], "b64_png": first["a"]["b64_png"]}
    # the stored images are the service's: the shown one byte for byte, and a fresh generation of the other
    assert base64.b64decode(first["b"]["b64_png"]) == png_shown
    again = client.post("/v1/generate", json={"prompt": "a red square", "model": "base", "seed": 9, **PARAMS})
    assert base64.b64decode(first["a"]["b64_png"]) == base64.b64decode(again.json()["images"][0]["b64_png"])
    assert first["a"]["b64_png"] != first["b"]["b64_png"]  # the tuned model draws another image
    assert "b64_png" not in lines(client.get(f"/v1/preferences?after={before}&limit=1"))[0]["a"]
    # a restarted service (new app, same database) has every row
    restarted = fresh_client()
    assert int(restarted.get("/v1/preferences?limit=0").headers["X-Total-Count"]) == before + 5
    assert lines(restarted.get(f"/v1/preferences?after={before}&limit=5&images=true")) == seen


# --------------------------------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------------------------------


def test_store_round_trip_and_restart_sqlite(tmp_path):
    check_store_round_trip(f"sqlite:///{tmp_path}/fb.db")


def test_schema_version_sqlite(tmp_path):
    check_schema_version(f"sqlite:///{tmp_path}/fb.db")


def test_relative_sqlite_paths_are_taken_from_the_root(tmp_path):
    assert resolve_database_url("sqlite:///outputs/f.db", tmp_path) == f"sqlite:///{tmp_path}/outputs/f.db"
    assert resolve_database_url("postgresql://u:p@h/db").startswith("postgresql+psycopg://u:p@h/db")
    with pytest.raises(FeedbackStoreError, match="feedback.database_url='nonsense' is not a database URL"):
        resolve_database_url("nonsense")


def test_api_store_export_images_restart(generator, runs_root, tmp_path):
    url = f"sqlite:///{tmp_path}/fb.db"
    check_api(make_client(generator, runs_root, url), lambda: make_client(generator, runs_root, url))


def test_a_comparison_outlives_its_checkpoint(generator, tiny_dir, tmp_path):
    root = tmp_path / "outputs"
    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    randomize_lora(policy, seed=4)
    save_run_checkpoint(policy, root / "gone", 1)
    client = make_client(generator, root, f"sqlite:///{tmp_path}/fb.db")
    r = client.post("/v1/preferences", json=pref("b", model_b="gone@step_000001"))
    assert r.status_code == 201, r.text
    shutil.rmtree(root / "gone")
    assert_error(
        client.post("/v1/preferences", json=pref("b", model_b="gone")), 404, "b.model", "model_not_found"
    )
    (row,) = lines(client.get("/v1/preferences?images=true"))
    png = base64.b64decode(row["b"]["b64_png"])
    assert png.startswith(PNG) and hashlib.sha256(png).hexdigest() == r.json()["b"]["sha256"]
    assert row["b"]["checkpoint"] == "gone@step_000001"


def test_a_shown_image_is_not_generated_again(generator, runs_root, tmp_path, monkeypatch):
    client = make_client(generator, runs_root, f"sqlite:///{tmp_path}/fb.db")
    for seed in (5, 6):
        body = {"prompt": "a red square", "model": "base", "seed": seed, **PARAMS}
        assert client.post("/v1/generate", json=body).status_code == 200
    calls = []
    real = generator.generate
    monkeypatch.setattr(generator, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert client.post("/v1/preferences", json=pref(model_b="base", seed_a=5, seed_b=6)).status_code == 201
    assert calls == []  # both images came from the cache
    assert client.post("/v1/preferences", json=pref(model_b="base", seed_a=5, seed_b=7)).status_code == 201
    assert calls == [1]  # seed 7 was never shown: generated once


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        (pref("c"), 422, "choice", "validation_error"),
        (pref("A"), 422, "choice", "validation_error"),
        (pref(model_a="../../etc"), 400, "a.model", "invalid_model_id"),
        (pref(model_b="tuned/../x"), 400, "b.model", "invalid_model_id"),
        (pref(model_b="nosuchrun"), 404, "b.model", "model_not_found"),
        (pref(model_a="tuned@step_000009"), 404, "a.model", "model_not_found"),
        (pref(seed_a=-1), 422, "a.seed", "validation_error"),
        (pref(rater="bob/../x"), 422, "rater", "validation_error"),
        (pref(height=12), 422, "height", "validation_error"),
        (pref(extra=1), 422, "extra", "validation_error"),
        ({k: v for k, v in pref().items() if k != "choice"}, 422, "choice", "validation_error"),
    ],
)
def test_bad_preferences_are_4xx_with_the_error_shape(
    generator, runs_root, tmp_path, body, status, param, code
):
    client = make_client(generator, runs_root, f"sqlite:///{tmp_path}/fb.db")
    err = assert_error(client.post("/v1/preferences", json=body), status, param, code)
    if param == "choice" and body.get("choice"):
        assert "'a', 'b', 'tie' or 'both_bad'" in err["message"], err
    assert client.get("/v1/preferences?limit=0").headers["X-Total-Count"] == "0"  # nothing stored


def test_export_query_auth_and_body_limits(generator, runs_root, tmp_path, monkeypatch):
    client = make_client(generator, runs_root, f"sqlite:///{tmp_path}/fb.db")
    assert_error(client.get("/v1/preferences?limit=5000"), 422, "query.limit", "validation_error")
    assert_error(client.get("/v1/preferences?after=-1"), 422, "query.after", "validation_error")
    assert_error(client.get("/v1/preferences?images=maybe"), 422, "query.images", "validation_error")
    assert_error(
        client.post("/v1/preferences", content=b"{", headers={"Content-Type": "application/json"}),
        400,
        None,
        "json_invalid",
    )
    big = pref(prompt="x" * 70_000)
    assert_error(client.post("/v1/preferences", json=big), 413, "body", "body_too_large")
    monkeypatch.setenv("SCOREACTION_API_KEY", "s3cret")
    assert_error(client.get("/v1/preferences"), 401, "Authorization", "invalid_api_key")
    assert_error(client.post("/v1/preferences", json=pref()), 401, "Authorization", "invalid_api_key")
    page = client.get("/playground")  # the page itself is public; it asks for the key
    assert page.status_code == 200 and "sessionStorage" in page.text and "/*{{JS}}*/" not in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    auth = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/preferences", json=pref(), headers=auth).status_code == 201


def test_an_unreachable_database_is_a_503_not_a_500(generator, runs_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    client = make_client(generator, runs_root, f"sqlite:///{blocker}/sub/fb.db")
    err = assert_error(client.post("/v1/preferences", json=pref()), 503, None, "feedback_store_unavailable")
    assert "cannot" in err["message"]
    assert_error(client.get("/v1/preferences"), 503, None, "feedback_store_unavailable")
