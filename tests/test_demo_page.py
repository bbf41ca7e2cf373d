"""The demo page at ``GET /``, driven in a real headless Chromium through Selenium.

Uses Debian's ``chromium`` and ``chromium-driver`` (browser downloads do not work here). Without
them the browser tests skip, except under CI (``CI=true``), where a missing browser fails them so
that CI really runs them; ``.ci/run`` installs both.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sentiment.model import SentimentClassifier
from sentiment.testing import free_port
from tests.helpers import API_KEY, deploy, tiny_args

# A real browser against a live endpoint: an end-to-end run, outside the fast suite.
pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
WAIT_S = 30


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).exists() or shutil.which("chromedriver") is None:
        return f"{CHROMIUM} or chromedriver is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def base_url(ray_session: Any, tiny_checkpoint: Path) -> Iterator[str]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(
        {
            "open": (tiny_args(tiny_checkpoint, gather_wait_s=0.01), "/"),
            "guarded": (tiny_args(tiny_checkpoint, gather_wait_s=0.01, api_key=API_KEY), "/guarded"),
        }
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _browser_missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the browser test cannot run: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _classify_in_page(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "classify").click()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error-card").is_displayed()
    )
    WebDriverWait(driver, WAIT_S).until(expected_conditions.element_to_be_clickable((By.ID, "classify")))


def test_get_root_serves_a_self_contained_page_and_post_root_still_classifies(base_url: str) -> None:
    page = httpx.get(f"{base_url}/", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<textarea" in html
    assert 'id="classify"' in html
    # Works offline: nothing is fetched from another host.
    for marker in ("http://", "https://", "//cdn", "@import", "<link"):
        assert marker not in html, marker
    inference = httpx.post(f"{base_url}/", json={"inputs": "good"}, timeout=30)
    assert inference.status_code == 200, inference.text
    assert {item["label"] for item in inference.json()[0]} == {"neg", "pos"}


def test_page_loads_without_the_api_key_but_its_api_calls_need_it(base_url: str) -> None:
    assert httpx.get(f"{base_url}/guarded/", timeout=30).status_code == 200
    assert httpx.post(f"{base_url}/guarded/", json={"inputs": "good"}, timeout=30).status_code == 401
    assert httpx.get(f"{base_url}/guarded/info", timeout=30).status_code == 401


def test_typing_a_review_and_clicking_classify_shows_the_models_answer(
    base_url: str, browser: Any, classifier: SentimentClassifier, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{base_url}/")
    text = "A warm, funny film with a great cast; I loved every minute of it."
    _classify_in_page(browser, text)
    want = classifier.predict([text])[0]

    assert browser.find_element(By.ID, "error-card").is_displayed() is False
    assert browser.find_element(By.ID, "label").text == want.label
    bars = {row.get_attribute("data-label"): row.text for row in browser.find_elements(By.CSS_SELECTOR, ".bar")}
    assert set(bars) == set(want.scores)
    for label, p in want.scores.items():
        assert bars[label].endswith(f"{100 * p:.1f}%")
    assert browser.find_element(By.ID, "tokens").text == str(want.num_tokens)
    assert browser.find_element(By.ID, "cut").text.startswith("no")
    assert browser.find_element(By.ID, "latency").text.endswith(" ms")
    assert "tiny" in browser.find_element(By.ID, "model").text  # /info answered: the model line names the checkpoint

    screenshot = tmp_path / "demo.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    print(f"demo page screenshot: {screenshot}")


def test_a_long_review_shows_how_it_was_cut(base_url: str, browser: Any, classifier: SentimentClassifier) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{base_url}/")
    text = "a truly great movie " * 200
    _classify_in_page(browser, text)
    want = classifier.predict([text])[0]
    assert want.truncated
    content = classifier.max_length - 2
    head = min(classifier.head_tokens, content)
    assert browser.find_element(By.ID, "label").text == want.label
    assert browser.find_element(By.ID, "tokens").text == str(want.num_tokens)
    assert browser.find_element(By.ID, "cut").text == f"head_tail (kept first {head} + last {content - head} tokens)"


def test_api_errors_are_shown_on_the_page(base_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{base_url}/")
    _classify_in_page(browser, "   ")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.text == "HTTP 400 (empty): text is empty"
    assert not browser.find_element(By.ID, "result").is_displayed()


def test_with_an_api_key_the_page_asks_for_it_then_classifies(
    base_url: str, browser: Any, classifier: SentimentClassifier
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{base_url}/guarded/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "key-card").is_displayed())
    assert "401" in browser.find_element(By.ID, "error").text

    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "save-key").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
    text = "Dull and far too long."
    _classify_in_page(browser, text)
    assert browser.find_element(By.ID, "label").text == classifier.predict([text])[0].label
    assert not browser.find_element(By.ID, "key-card").is_displayed()
