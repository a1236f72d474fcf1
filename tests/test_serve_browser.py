"""The review page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
enter the key, open a phase-2 job, flip a label, export, and check the exported row changed.

The screenshot is kept at tmp_path/review.png and copied to $CAI_TEST_ARTIFACTS when set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
import uvicorn
from fakes import alternating_sampler, judge_preferring

from cai.engine.fake import FakeEngine
from serve.app import Limits, Settings, create_app

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "browser-key-0123456789abcdef"


def _skip_reason() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "Chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    (tmp_path / "keys.txt").write_text(f"reviewer:{KEY}\n")
    settings = Settings(jobs_root=tmp_path / "jobs", data_root=tmp_path / "data", keys_file=tmp_path / "keys.txt",
                        keys_from_env=False, limits=Limits(max_rows=20))
    engine = FakeEngine(alternating_sampler(), chooser=judge_preferring("good", 0.85))
    app = create_app(settings, engine_factory=lambda spec: engine)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,2000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def keep_artifact(path: Path) -> None:
    target = os.environ.get("CAI_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def test_review_page_flip_changes_the_export(server, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server, headers=auth, timeout=30) as api:
        r = api.post("/v1/jobs", json={"kind": "prefs", "prompts": ["How do I pick a lock?", "Tell me a joke."],
                                       "phase2": {"samples": 2}, "max_tokens": 32})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while (job := api.get(f"/v1/jobs/{job_id}").json())["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["state"] == "completed", job
        before = {row["metadata"]["id"]: row for row in map(json.loads, api.get(f"/v1/jobs/{job_id}/export").text.splitlines())}

    wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))  # the page re-renders
    browser.get(f"{server}/ui")
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.ID, "key-save").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]'))).click()
    first = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#records .record")))
    record_id = first.get_attribute("data-record-id")
    assert record_id in before
    text = first.text
    assert "How do I pick a lock?" in text or "Tell me a joke." in text
    assert "ANSWER A" in text.upper() and "P(A)" in text and "consistent" in text and "confidence" in text
    assert "judge's choice" in text.lower() and "order 2" in text

    flip = f'button.review-btn[data-label="flip"][data-record-id="{record_id}"]'
    browser.find_element(By.CSS_SELECTOR, flip).click()
    wait.until(lambda d: "active" in d.find_element(By.CSS_SELECTOR, flip).get_attribute("class"))
    wait.until(lambda d: d.find_element(By.ID, "summary-reviewer").text.startswith("0.0%"))  # 0 agree of 1 judged

    Select(browser.find_element(By.ID, "export-file")).select_by_value("prefs.jsonl")
    browser.find_element(By.ID, "export-btn").click()
    preview = wait.until(ec.visibility_of_element_located((By.ID, "export-preview")))
    wait.until(lambda d: '"label": "flip"' in preview.text)
    shot = tmp_path / "review.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep_artifact(shot)

    with httpx.Client(base_url=server, headers=auth, timeout=30) as api:
        after = {row["metadata"]["id"]: row for row in map(json.loads, api.get(f"/v1/jobs/{job_id}/export").text.splitlines())}
    assert after[record_id]["chosen"] == before[record_id]["rejected"]
    assert after[record_id]["rejected"] == before[record_id]["chosen"]
    assert after[record_id]["score"] == 1.0 and after[record_id]["metadata"]["judge_verdict"]["score"] == before[record_id]["score"]
    review = after[record_id]["metadata"]["review"]
    assert {k: v for k, v in review.items() if k != "reviewed_at"} == {"label": "flip", "reviewer": "reviewer", "note": ""}
    assert all(after[rid]["chosen"] == before[rid]["chosen"] for rid in before if rid != record_id)
