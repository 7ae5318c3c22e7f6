"""The live explorer in a real browser: Debian's Chromium driven headless by selenium through
chromedriver, against a uvicorn server in this process. Skipped, saying why, where Chromium,
chromedriver or selenium is missing (apt-get install -y chromium chromium-driver).

Also a script: `python tests/test_serve_browser.py DB docs/serve.png` serves DB, asks its first
stored query with two methods and saves the page as a 1280 px wide screenshot.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sys.path.insert(0, str(Path(__file__).parent))

from serve_db import EVIL_ID, EVIL_PROMPT, EVIL_TARGET, EVIL_TEXT, build_serve_db, live_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WIDTH = 1280


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"needs {CHROMIUM} (apt-get install -y chromium)"
    if not Path(CHROMEDRIVER).exists():
        return f"needs {CHROMEDRIVER} (apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install 'trackstar-db[test]')"
    return None


needs_browser = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def browser(profile: Path, width: int = WIDTH, height: int = 1000):
    """Headless Chromium with a fresh profile and its console log readable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def wait(driver, condition, seconds: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))


def ask(driver, prompt: str, target: str, methods: list[str], k: int = 3) -> None:
    """Type a prompt and target, tick exactly `methods`, submit, wait for their columns."""
    from selenium.webdriver.common.by import By

    for field, value in (("prompt", prompt), ("target", target), ("k", str(k))):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    for box in driver.find_elements(By.CSS_SELECTOR, "#methods input"):
        if box.is_selected() != (box.get_attribute("value") in methods):
            box.click()
    driver.find_element(By.ID, "run").click()
    wait(driver, lambda d: sorted(s.get_attribute("data-method") for s in d.find_elements(By.CSS_SELECTOR, "#results .run"))
         == sorted(methods) or d.find_element(By.ID, "query-error").text)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), 60)


def errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def served(tiny_db_template, tmp_path_factory):
    from trackstar_db.serve import app

    with live_server(app(build_serve_db(tiny_db_template, tmp_path_factory.mktemp("serve_browser")))) as url:
        yield url + "/"


@pytest.fixture
def driver(tmp_path):
    chrome = browser(tmp_path / "profile")
    yield chrome
    chrome.quit()


@needs_browser
def test_explorer_in_chromium(served, driver, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(driver, served)
    title = driver.title
    ask(driver, EVIL_PROMPT, EVIL_TARGET, ["bm25", "grad-cos"])
    assert driver.find_element(By.ID, "query-error").text == ""
    columns = driver.find_elements(By.CSS_SELECTOR, "#results .run")
    assert [c.find_element(By.TAG_NAME, "h2").text.split()[0] for c in columns] == ["bm25", "grad-cos"]
    # proponents for both methods (only the hostile text shares words with the prompt: one for bm25)
    assert [len(c.find_elements(By.CSS_SELECTOR, "ol.proponents > li")) for c in columns] == [1, 3]
    # the hostile text: shown as text, nothing in it ran or became an element
    first = columns[0].find_element(By.CSS_SELECTOR, "ol.proponents > li")
    assert EVIL_TEXT in first.text.replace("\n", " ")
    assert first.find_elements(By.CSS_SELECTOR, "mark") and not first.find_elements(By.CSS_SELECTOR, "script, img")
    results = driver.find_element(By.ID, "results")
    assert not results.find_elements(By.CSS_SELECTOR, "script, img")
    assert driver.title == title and driver.execute_script("return window.__xss === undefined")
    # token shading on the gradient column, labelled as in the static explorer
    assert all(c.find_elements(By.CSS_SELECTOR, "ol.proponents > li span.lab") for c in columns)  # evidence labels
    shaded = columns[1].find_elements(By.CSS_SELECTOR, "span.tk")
    assert shaded and "token parts sum to" in columns[1].text and "score " in columns[1].text
    assert shaded[0].get_attribute("title")[0] in "+-"
    # the example link opens its text and metadata
    link = first.find_element(By.CSS_SELECTOR, "a.example-link")
    assert link.text == EVIL_ID
    link.click()
    wait(driver, lambda d: d.find_element(By.ID, "example").is_displayed()
         and d.find_element(By.ID, "example-text").text == EVIL_TEXT)
    assert "evil.jsonl" in driver.find_element(By.ID, "example-meta").text
    assert errors(driver) == []  # loading, asking, shading, following a link: a clean console
    # the evaluation table and the SQL box
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#evaluation table th"))
    assert "mrr" in driver.find_element(By.ID, "evaluation").text
    sql = driver.find_element(By.ID, "sql")
    sql.clear()
    sql.send_keys("SELECT example_id, text FROM examples WHERE example_id = 'evil-1'")
    driver.find_element(By.ID, "sql-run").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#sql-result td"))
    assert EVIL_TEXT in driver.find_element(By.ID, "sql-result").text
    assert not driver.find_element(By.ID, "sql-result").find_elements(By.CSS_SELECTOR, "script, img")
    sql.clear()
    sql.send_keys("DELETE FROM examples")
    driver.find_element(By.ID, "sql-run").click()
    wait(driver, lambda d: d.find_element(By.ID, "sql-error").text)
    assert "read-only" in driver.find_element(By.ID, "sql-error").text
    assert driver.find_element(By.ID, "sql-result").text == ""
    refused = errors(driver)  # the browser logs the refusal's 400 itself, and nothing else
    assert len(refused) == 1 and "/api/sql" in refused[0] and "400" in refused[0], refused
    # at 1280 px nothing overflows sideways
    assert driver.execute_script("return document.documentElement.scrollWidth") <= WIDTH
    png = tmp_path / "serve.png"
    driver.save_screenshot(str(png))
    _not_blank(png)


@needs_browser
def test_console_errors_are_seen(served, driver):
    """The console check can fail: a bad request from the page shows up as a SEVERE entry."""
    open_page(driver, served)
    driver.execute_script("fetch('api/nothing')")
    time.sleep(0.5)
    assert any("404" in message for message in errors(driver))


def _not_blank(png: Path) -> None:
    from PIL import Image

    image = Image.open(png).convert("L")
    low, high = image.getextrema()
    assert image.size[0] == WIDTH and high - low > 100


def screenshot(db: Path, out: Path) -> Path:
    """Serve `db`, ask its first stored query (trackstar, grad-cos and bm25 where served) and run the
    SQL box's sample statement; save a full-height
    1280 px screenshot of the page at `out`."""
    from selenium.webdriver.common.by import By

    from trackstar_db import connect
    from trackstar_db.serve import app

    first = connect(db).sql("SELECT prompt, target FROM queries ORDER BY query_id LIMIT 1").to_pylist()[0]
    with live_server(app(db)) as url, tempfile.TemporaryDirectory() as profile:
        driver = browser(Path(profile))
        try:
            open_page(driver, url + "/")
            available = [b.get_attribute("value") for b in driver.find_elements(By.CSS_SELECTOR, "#methods input")
                         if b.is_enabled()]
            methods = [m for m in ("trackstar", "grad-cos", "bm25") if m in available][:3]
            ask(driver, first["prompt"], first["target"], methods, k=5)
            driver.find_element(By.ID, "sql-run").click()  # the SQL box's sample statement, as a table
            wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#sql-result td"))
            wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#evaluation th"))
            for _ in range(3):  # the window grows until the whole page fits (headless takes the viewport)
                height = driver.execute_script("return document.documentElement.scrollHeight")
                inner = driver.execute_script("return window.innerHeight")
                if inner >= height:
                    break
                driver.set_window_size(WIDTH, min(driver.get_window_size()["height"] + height - inner + 10, 4000))
                time.sleep(0.3)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    _not_blank(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/test_serve_browser.py DB OUT.png")
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
