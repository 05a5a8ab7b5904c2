"""The search page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by Selenium) against `embedstore serve` on a generated store."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Chromium and its driver: apt-get install chromium chromium-driver")


@contextmanager
def serving(store_path, cache_folder):
    """`embedstore serve` on a free loopback port, in a thread of this process: (its URL, the app)."""
    import uvicorn

    from embedstore.serve.app import ServeSettings, create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(ServeSettings(store_path, cache_folder=cache_folder))
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(patient_store, tmp_path):
    with serving(patient_store[0], tmp_path / "cache") as (url, _):
        yield url


@contextmanager
def chromium():
    """Headless Chromium under Selenium, quit on the way out."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser():
    with chromium() as driver:
        yield driver


def wait_for_results(driver, previous_status: str) -> list[dict]:
    """Once the status line has changed and every tile's images have loaded: each tile's score and
    its images' natural widths."""
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(driver):
        status = driver.find_element("id", "status").text
        if status == previous_status or status.startswith(("Searching", "Embedding")):
            return False
        assert "error" not in driver.find_element("id", "status").get_attribute("class"), status
        tiles = driver.execute_script("""
            return [...document.querySelectorAll('.tile')].map(tile => ({
              score: Number(tile.dataset.score),
              widths: [...tile.querySelectorAll('img')].map(img => img.complete ? img.naturalWidth : -1)}));""")
        return tiles if tiles and all(width > 0 for tile in tiles for width in tile["widths"]) else False

    return WebDriverWait(driver, 60).until(settled)


def test_upload_more_like_this_and_study_level_in_chromium(server, browser, patient_store, tmp_path):
    browser.get(server + "/?feature=patch_mean")  # under random weights the CLS token is constant
    status = browser.find_element("id", "status").text
    browser.find_element("id", "file").send_keys(str(patient_store[1].pngs[1]))
    tiles = wait_for_results(browser, status)
    scores = [tile["score"] for tile in tiles]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0, abs=1e-4)
    assert "by=upload_id" in browser.current_url  # the state is in the URL

    status = browser.find_element("id", "status").text
    browser.execute_script("arguments[0].click()", browser.find_elements("css selector", ".tile .more")[1])
    tiles = wait_for_results(browser, status)
    assert "by=key" in browser.current_url
    assert [t["score"] for t in tiles] == sorted((t["score"] for t in tiles), reverse=True)

    status = browser.find_element("id", "status").text
    browser.find_element("css selector", "input[name=level][value=study]").click()
    tiles = wait_for_results(browser, status)
    assert "level=study" in browser.current_url and "studies" in browser.find_element("id", "status").text
    assert [t["score"] for t in tiles] == sorted((t["score"] for t in tiles), reverse=True)
    assert any(len(tile["widths"]) > 2 for tile in tiles)  # a study's strip of slices, loaded
    browser.save_screenshot(str(tmp_path / "study-level.png"))
    assert (tmp_path / "study-level.png").stat().st_size > 10_000

    shared = browser.current_url  # the URL alone brings the same results back
    browser.get("about:blank")
    browser.get(shared)
    assert len(wait_for_results(browser, "")) == len(tiles)


def test_the_page_starts_on_a_feature_that_ranks_and_says_why(server, browser):
    """Under random weights every CLS score is 1.0000: the page starts on the patch mean and says so."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element("id", "feature-note").text)
    note = browser.find_element("id", "feature-note")
    assert note.is_displayed() and "random weights" in note.text
    assert browser.find_element("id", "feature").get_attribute("value") == "patch_mean"
    browser.get(server + "/?feature=cls")  # a feature the URL names is taken as it is, without the note
    WebDriverWait(browser, 30).until(lambda b: b.find_element("id", "feature").get_attribute("value") == "cls")
    assert not browser.find_element("id", "feature-note").is_displayed()
