"""The console in a real browser (Debian's chromium driven by Selenium) against a real node, worker, Redis and peers.

Two series arrive: one from storescp's AE, delivered; one from a PACS that refuses every result (0xC000), failed.
The browser logs in, reads the overview, opens the failed job, retries it (the PACS accepts now), tests the routing
rules on a received series and sees the SEG thumbnails of the delivered job. Screenshots go to PACSAI_SCREENSHOT_DIR
(docs/console to update the README's) or the test's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from pacsai.jobs import JobState
from pacsai.state import JobRow, State
from tests.checks import reuid_series
from tests.conftest import need
from tests.pacs import ScriptedPacs
from tests.services import REPO, free_port, port_open, wait_until
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PASSWORD = "browser test pass phrase"
REFUSED = 0xC000
SLICES = 10


def chrome(profile: Path) -> webdriver.Chrome:
    """Headless Debian chromium with its own chromedriver (no Selenium Manager download), quiet and fresh."""
    options = webdriver.ChromeOptions()
    options.binary_location = need("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1180,860",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=need("chromedriver")))


class Console:
    """The browser on the console at `base`, saving screenshots as small palette PNGs."""

    def __init__(self, driver: webdriver.Chrome, base: str, shots: Path) -> None:
        self.driver, self.base, self.shots = driver, base, shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def text(self, element_id: str) -> str:
        return str(self.driver.find_element(By.ID, element_id).text)

    def click(self, element_id: str) -> None:
        self.driver.find_element(By.ID, element_id).click()

    def wait(self, check: Callable[[webdriver.Chrome], object], timeout_s: float = 20) -> None:
        WebDriverWait(self.driver, timeout_s, poll_frequency=0.2).until(check)

    def until_reloaded(self, check: Callable[[webdriver.Chrome], bool], timeout_s: float) -> None:
        """Reload the page until `check` holds (the console's pages are plain HTML, refreshed by the user)."""

        def reloaded(driver: webdriver.Chrome) -> bool:
            if check(driver):
                return True
            driver.refresh()
            return False

        self.wait(reloaded, timeout_s)

    def shot(self, name: str) -> None:
        assert "CANARY" not in self.driver.page_source
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        with Image.open(path) as image:
            image.convert("RGB").quantize(colors=64).save(path, optimize=True)


def _pacsai_users_add(env: dict[str, str], workdir: Path) -> None:
    password = workdir / "password"
    password.write_text(PASSWORD)
    argv = [sys.executable, "-m", "worker.cli", "users", "add", "otto", "--role", "operator", "--password-file"]
    subprocess.run(
        [*argv, str(password)],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        check=True,
        capture_output=True,
        timeout=60,
    )


def _jobs(data: Path) -> dict[str, JobRow]:
    """The jobs by destination AE title."""
    state = State(data / "pacsai.db")
    try:
        return {row.destination: row for row in state.jobs_in(*JobState)}
    finally:
        state.close()


@pytest.fixture()
def site(
    tmp_path: Path, stack: Callable[..., Stack], pacs: StoreScpPacs, redis_url: str, ct_series: Path
) -> Iterator[tuple[Stack, str]]:
    """Node (console beside it) and worker; one delivered job (storescp) and one failed job (a refusing PACS)."""
    need("storescu"), need("chromium"), need("chromedriver")  # before starting anything (CI=true: a failure)
    refuser = ScriptedPacs(ae_title="REFUSER", script=[REFUSED, REFUSED])  # SEG and SR refused, then it accepts
    web_port = free_port()
    pacsai = stack(
        peers=f"{pacs.peer},REFUSER@127.0.0.1:{refuser.port}",
        broker_url=redis_url,
        PACSAI_WEB_PORT=str(web_port),
        PACSAI_QUIET_PERIOD_S="2",
    )
    _pacsai_users_add(pacsai.env, tmp_path)
    pacsai.start("worker")  # first: it imports torch while the node starts
    pacsai.start("node")
    first = tmp_path / "first-slices"  # the rule's minimum: half the inference, encoding and sending time
    first.mkdir()
    for path in sorted(p for p in ct_series.iterdir() if p.name.startswith("CT"))[:SLICES]:
        (first / path.name).symlink_to(path)
    good, canary = tmp_path / "good", tmp_path / "canary"
    reuid_series(first, good, "1.2.826.0.1.3680043.10.1051.778")
    reuid_series(first, canary, "1.2.826.0.1.3680043.10.1051.779", PatientName="CANARY^BROWSER^Kp4")
    pacsai.send(sorted(good.iterdir()), pacs.ae_title)
    pacsai.send(sorted(canary.iterdir()), "REFUSER")
    wait_until(lambda: port_open(web_port), 30, "the console")
    try:
        pacsai.wait_jobs({"delivered": 1, "failed": 1}, timeout_s=60)
        yield pacsai, f"http://127.0.0.1:{web_port}"
    finally:
        refuser.stop()


def test_console_in_chromium(site: tuple[Stack, str], tmp_path: Path) -> None:
    pacsai, base = site
    jobs = _jobs(pacsai.data)
    good, failed = jobs["STORESCU"], jobs["REFUSER"]
    shots = Path(os.environ.get("PACSAI_SCREENSHOT_DIR") or tmp_path / "screenshots")
    driver = chrome(tmp_path / "chromium-profile")
    try:
        browser = Console(driver, base, shots)
        _login_and_overview(browser)
        _retry_the_failed_job(browser, failed.job_id)
        _rules_tester(browser)  # while the retried job runs
        _thumbnails(browser, good.job_id)
        browser.open(f"/jobs/{failed.job_id}")
        browser.until_reloaded(lambda d: d.find_element(By.ID, "job-state").text == "delivered", 45)
        assert "retried by console user otto" in browser.text("timeline")
        logged = driver.get_log("browser")  # type: ignore[no-untyped-call]
        problems = [entry for entry in logged if entry["level"] == "SEVERE"]
        assert problems == [], problems  # no script error, no Content-Security-Policy violation
    finally:
        driver.quit()
    assert _jobs(pacsai.data)["REFUSER"].state is JobState.DELIVERED
    for process in pacsai.processes:  # node (with the console) and worker: no patient name in their logs
        assert "CANARY" not in process.log(), process.name


def _login_and_overview(browser: Console) -> None:
    browser.open("/jobs")
    browser.wait(lambda d: d.current_url.endswith("/login"))  # every page asks for a login first
    browser.driver.find_element(By.ID, "username").send_keys("otto")
    browser.driver.find_element(By.ID, "password").send_keys("wrong password")
    browser.click("login")
    browser.wait(lambda driver: driver.find_elements(By.ID, "login-error"))  # each submit loads a new page
    assert "wrong user name or password" in browser.text("login-error")
    (refused,) = browser.driver.get_log("browser")  # type: ignore[no-untyped-call]
    assert "/login - Failed to load resource: the server responded with a status of 401" in refused["message"]
    browser.driver.find_element(By.ID, "username").send_keys("otto")
    browser.driver.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.shot("login")
    browser.click("login")
    browser.wait(lambda d: d.current_url == browser.base + "/")
    by_state = browser.text("jobs-by-state")
    assert "delivered 1" in by_state and "failed 1" in by_state
    assert "infer.ct-organs-tiny.stat" in browser.text("queues")
    browser.until_reloaded(lambda d: "ct-organs-tiny" in d.find_element(By.ID, "workers").text, 25)
    assert "end_to_end" in browser.text("stages") and "reachable" in browser.text("peers")
    browser.shot("overview")


def _retry_the_failed_job(browser: Console, job_id: str) -> None:
    browser.open("/jobs?state=failed")
    browser.driver.find_element(By.CSS_SELECTOR, f"a[href='/jobs/{job_id}']").click()
    browser.wait(lambda driver: driver.current_url.endswith(f"/jobs/{job_id}"))
    assert browser.text("job-state") == "failed"
    timeline = browser.text("timeline")
    assert "permanent" in timeline and "C000" in timeline.upper(), timeline
    assert "ct-abdominal-organs" in browser.text("routing")
    browser.shot("job-failed")
    browser.click("action-retry")
    browser.wait(lambda driver: "Confirm: retry" in driver.find_element(By.TAG_NAME, "h1").text)
    browser.click("confirm")
    browser.wait(lambda d: d.current_url.endswith(f"/jobs/{job_id}"))
    assert browser.text("job-state") in ("pending", "queued", "running")


def _rules_tester(browser: Console) -> None:
    browser.open("/rules")
    Select(browser.driver.find_element(By.ID, "series-pick")).select_by_index(0)
    browser.click("test-series")
    browser.wait(lambda driver: driver.find_elements(By.ID, "rule-outcomes"))  # the form's answer is a new page
    outcomes = browser.text("rule-outcomes")
    assert "ct-abdominal-organs ct-organs-tiny matches" in outcomes, outcomes
    assert "chest-xray-pneumonia cxr-pneumonia no" in outcomes
    browser.shot("rules")


def _thumbnails(browser: Console, job_id: str) -> None:
    browser.open(f"/jobs/{job_id}")
    images = browser.driver.find_elements(By.CSS_SELECTOR, "#thumbnails img")
    assert len(images) >= 1
    for image in images:
        browser.driver.execute_script("arguments[0].scrollIntoView()", image)
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    browser.wait(lambda d: all(d.execute_script(loaded, image) for image in images), 30)
    assert "SEG" in browser.text("results")
    browser.driver.execute_script("document.getElementById('results').scrollIntoView()")
    browser.shot("job-thumbnails")
