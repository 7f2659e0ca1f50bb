"""The playground in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium; nothing
downloads a browser): the page asks for the API key, shows two images, takes one choice by mouse and one by
keyboard, and both rows land in the database. ``make test-browser`` installs what it needs and runs it."""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora

from scoreaction.checkpoint import save_run_checkpoint
from scoreaction.config import ModelConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.serving.feedback_store import FeedbackStore
from scoreaction.serving.generate import ImageGenerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serve/ package at the repo root
from serve.feedback_local import build_local_app  # noqa: E402
from serve.settings import ServeSettings  # noqa: E402

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "play-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir):
    """The Ray-free app (base + one tuned run) under uvicorn on a free port; yields (url, database url)."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("chromium and chromium-driver are not installed (make test-browser installs them)")
    pytest.importorskip("selenium")
    import uvicorn

    tmp = tmp_path_factory.mktemp("browser")
    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    randomize_lora(policy, seed=2)
    save_run_checkpoint(policy, tmp / "outputs" / "tuned", 1)
    db = f"sqlite:///{tmp}/feedback.db"
    settings = ServeSettings.model_validate(
        {"checkpoint_root": str(tmp / "outputs"), "feedback": {"database_url": db}}
    )
    torch.set_num_threads(1)
    generator = ImageGenerator(
        DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir))), 1
    )
    app, _ = build_local_app(generator, settings, root=tmp)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", db
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def test_rate_two_pairs_with_mouse_and_keyboard(served, browser, monkeypatch):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, db = served
    monkeypatch.setenv("SCOREACTION_API_KEY", KEY)  # the guard reads it on every request
    wait = WebDriverWait(browser, 60)
    browser.get(f"{url}/playground")
    # no key yet: the API answers 401 and the page asks for it
    key_input = wait.until(
        lambda d: d.find_element(By.ID, "key") if d.find_element(By.ID, "key").is_displayed() else None
    )
    key_input.send_keys(KEY)
    # the prompt first: the first pair is generated as soon as the key is in
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys("a blue circle")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()

    def ready(d) -> bool:
        return d.execute_script(
            "const a = document.getElementById('img-a'), b = document.getElementById('img-b');"
            "return document.body.dataset.state === 'ready' && a.complete && b.complete"
            " && a.naturalWidth > 0 && b.naturalWidth > 0;"
        )

    wait.until(ready)
    assert browser.find_element(By.ID, "count").text == "0"
    assert browser.execute_script("return sessionStorage.getItem('scoreaction_api_key')") == KEY
    first_src = browser.find_element(By.ID, "img-a").get_attribute("src")
    assert first_src.startswith("data:image/png;base64,")

    # mouse: click "B is better"
    ActionChains(browser).move_to_element(
        browser.find_element(By.CSS_SELECTOR, "button[data-choice='b']")
    ).click().perform()
    wait.until(lambda d: d.find_element(By.ID, "count").text == "1")
    wait.until(ready)
    # keyboard: the left arrow picks A
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
    wait.until(lambda d: d.find_element(By.ID, "count").text == "2")
    wait.until(ready)
    # and T records a tie
    browser.find_element(By.TAG_NAME, "body").send_keys("t")
    wait.until(lambda d: d.find_element(By.ID, "count").text == "3")

    store = FeedbackStore(db)
    rows = store.page()
    store.close()
    assert [r["choice"] for r in rows] == ["b", "a", "tie"]
    for r in rows:
        assert r["prompt"] == "a blue circle"
        assert {r["checkpoint_a"], r["checkpoint_b"]} == {"base", "tuned@step_000001"}
        assert r["image_a"].startswith(b"\x89PNG") and r["image_a"] != r["image_b"]
