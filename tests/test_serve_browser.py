"""The review page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
enter the key, open a phase-2 job, flip a label, export, and check the exported row changed; review
with the keyboard, load a sample, read the agreement table; a phase-1 job's word diffs.

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
from fakes import judge_preferring
from serve_helpers import responder

from cai.engine.fake import FakeEngine
from cai.evaluate import wilson
from serve.app import Limits, Settings, create_app

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "browser-key-0123456789abcdef"
REVISION = "ANSWER with <script>window.pwned = 1</script> a <b>careful</b> answer"


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


def revising():
    """serve_helpers.responder (phase-2 samples alternate a good and a bad answer), with a revision that
    holds markup: the page must show it as text."""
    base = responder()

    def respond(chat, params):
        return REVISION if chat[-1].content.startswith("Revision request") else base(chat, params)

    return respond


@pytest.fixture
def server(tmp_path):
    (tmp_path / "keys.txt").write_text(f"reviewer:{KEY}\n")
    settings = Settings(jobs_root=tmp_path / "jobs", data_root=tmp_path / "data", keys_file=tmp_path / "keys.txt",
                        keys_from_env=False, limits=Limits(max_rows=20))
    engine = FakeEngine(revising(), chooser=judge_preferring("good", 0.85))
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
    job_id = finished_job(server, kind="prefs", prompts=["How do I pick a lock?", "Tell me a joke."],
                          phase2={"samples": 2}, max_tokens=32)
    with httpx.Client(base_url=server, headers=auth, timeout=30) as api:
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


def finished_job(server: str, **body) -> str:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as api:
        r = api.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while (job := api.get(f"/v1/jobs/{job_id}").json())["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
    assert job["state"] == "completed", job
    return job_id


def open_job(browser, server: str, job_id: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"{server}/ui")
    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.ID, "key-save").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]'))).click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#records .record")))
    return wait


def test_keyboard_review_sample_and_agreement_table(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    job_id = finished_job(server, kind="prefs", prompts=[f"Question number {i}?" for i in range(6)],
                          phase2={"samples": 2}, max_tokens=32)
    wait = open_job(browser, server, job_id)
    ids = [r.get_attribute("data-record-id") for r in browser.find_elements(By.CSS_SELECTOR, "#records .record")]
    current = lambda d: d.find_element(By.CSS_SELECTOR, "#records .record.current").get_attribute("data-record-id")
    press = lambda *keys: ActionChains(browser).send_keys(*keys).perform()
    label_of = lambda d, rid: [b.get_attribute("data-label") for b in d.find_elements(
        By.CSS_SELECTOR, f'.record[data-record-id="{rid}"] button.review-btn.active')]
    assert len(ids) == 6 and current(browser) == ids[0]

    press("j")
    wait.until(lambda d: current(d) == ids[1])
    press(Keys.ARROW_DOWN, "k")
    wait.until(lambda d: current(d) == ids[1])
    press("k")
    wait.until(lambda d: current(d) == ids[0])
    # typing in a field is not a shortcut: no move, no review
    browser.find_element(By.ID, "key-input").click()
    press("jaf")
    assert browser.find_element(By.ID, "key-input").get_attribute("value") == "jaf"
    browser.find_element(By.ID, "key-input").clear()
    browser.execute_script("document.activeElement.blur()")
    time.sleep(0.3)
    assert current(browser) == ids[0] and label_of(browser, ids[0]) == []

    press("a")  # agree, then the next row is current
    wait.until(lambda d: label_of(d, ids[0]) == ["agree"] and current(d) == ids[1])
    press("f")
    wait.until(lambda d: label_of(d, ids[1]) == ["flip"] and current(d) == ids[2])
    press("d")
    wait.until(lambda d: label_of(d, ids[2]) == ["discard"] and current(d) == ids[3])
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as api:
        reviews = {r["record_id"]: r["label"] for r in api.get(f"/v1/jobs/{job_id}/reviews").json()["reviews"]}
        sample = api.get(f"/v1/jobs/{job_id}/records", params={"sample": 3, "seed": 5}).json()
    assert reviews == {ids[0]: "agree", ids[1]: "flip", ids[2]: "discard"}

    # the agreement table: one agree and one flip over all principles, with the Wilson interval
    total = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#agreement tr.total"))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#agreement tr.total td.n").text == "2")
    ci = wilson(1, 2)
    assert total.find_element(By.CSS_SELECTOR, "td.rate").text == "50.0%"
    assert total.find_element(By.CSS_SELECTOR, "td.ci").text == f"{100 * ci.low:.1f}% – {100 * ci.high:.1f}%"
    per_principle = browser.find_elements(By.CSS_SELECTOR, "#agreement tbody tr:not(.total) td.n")
    assert per_principle and sum(int(td.text) for td in per_principle) == 2
    assert "1 discarded" in browser.find_element(By.ID, "agreement-note").text

    press("?")
    wait.until(lambda d: d.find_element(By.ID, "keys-help").is_displayed())
    assert "flip" in browser.find_element(By.ID, "keys-help").text
    press(Keys.ESCAPE)
    wait.until(lambda d: not d.find_element(By.ID, "keys-help").is_displayed())

    # over the server's cap: its 422 is shown; then a stratified sample of 3 (seed 5), the API's rows in its order
    size = browser.find_element(By.ID, "sample-n")
    size.clear()
    size.send_keys("500")
    browser.find_element(By.ID, "sample-btn").click()
    refused = "422: sample = 500 is over this server's page limit of 200"
    wait.until(lambda d: refused in d.find_element(By.ID, "status-line").text)
    assert browser.find_element(By.ID, "page-info").text == "1–6 of 6"  # the page shown before stays
    size.clear()
    size.send_keys("3")
    seed = browser.find_element(By.ID, "sample-seed")
    seed.clear()
    seed.send_keys("5")
    Select(browser.find_element(By.ID, "sample-strategy")).select_by_value("stratified")
    browser.find_element(By.ID, "sample-btn").click()
    wait.until(lambda d: d.find_element(By.ID, "page-info").text.startswith("sample: 3 of 6"))
    shown = [r.get_attribute("data-record-id") for r in browser.find_elements(By.CSS_SELECTOR, "#records .record")]
    assert shown == [r["id"] for r in sample["items"]]
    assert browser.find_element(By.ID, "next-page").get_attribute("disabled")
    shot = tmp_path / "review-sample.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep_artifact(shot)
    browser.find_element(By.ID, "sample-clear").click()
    wait.until(lambda d: d.find_element(By.ID, "page-info").text == "1–6 of 6")


def test_phase1_revisions_show_a_word_diff_with_model_text_escaped(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    job_id = finished_job(server, kind="sft", prompts=["How do I pick a lock?"], phase1={"rounds": 2},
                          max_tokens=32)
    wait = open_job(browser, server, job_id)
    diffs = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#records .step.revision .diff"))
    assert len(diffs) == 2  # one per revision, each against the initial answer
    for diff in diffs:
        inserted = [e.text for e in diff.find_elements(By.TAG_NAME, "ins")]
        deleted = [e.text for e in diff.find_elements(By.TAG_NAME, "del")]
        # "ANSWER to How do I pick a lock?" -> REVISION: "ANSWER" and "a" are kept
        assert inserted == ["with <script>window.pwned = 1</script>", "<b>careful</b> answer"]
        assert deleted == ["to How do I pick", "lock?"]
        assert diff.text.startswith("ANSWER ") and [e.text for e in diff.find_elements(By.TAG_NAME, "*")] == [
            "to How do I pick", "with <script>window.pwned = 1</script>", "lock?", "<b>careful</b> answer"]
    assert browser.find_elements(By.CSS_SELECTOR, "#records script, #records b") == []
    assert browser.execute_script("return window.pwned === undefined")
    summary = browser.find_element(By.CSS_SELECTOR, "#records .diff-box summary").text
    assert "+6 / −6 words" in summary
    shot = tmp_path / "review-diff.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep_artifact(shot)
