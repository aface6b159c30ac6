"""The explore page in a real headless Chromium (Debian's chromium + chromium-driver, through Selenium), against
`python -m pipelines.explore` started as a user would: a text query shows loaded thumbnails, "more like this"
searches again from a result, an uploaded image finds itself, the keyboard moves through the results, a report
page lists the classes and opens a class's misclassified images with their neighbours, the duplicates page shows
pairs. Screenshots go to the test's folder, and to $EXPLORE_SCREENSHOTS (docs/ is made that way) when it is set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers.explore import free_port

from pipelines.config import REPO_ROOT

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser, pytest.mark.server,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                       "(apt-get install chromium chromium-driver; .ci/run and make install add them)"),
]
WAIT_S = 60


@pytest.fixture(scope="module")
def app_url(explored, tmp_path_factory):
    """The CLI entry point serving the explored dataset on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("explore-cli") / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.explore", f"embeddings_dir={explored['out']}",
                                 "model=tiny", "device=cpu", "index=exact", f"port={port}"], cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            requests.get(f"{url}/api/info", timeout=5)
            break
        except requests.ConnectionError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "explore did not start"
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def loaded_images(driver, selector: str) -> int:
    """How many images under `selector` have decoded pixels (lazy ones below the fold may not have loaded yet)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length;",
        selector)


def shoot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    target = os.environ.get("EXPLORE_SCREENSHOTS")
    if target:
        shutil.copy(tmp_path / name, Path(target) / name)


def test_search_more_like_this_upload_and_keys(browser, app_url, explored, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(app_url + "/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "the page")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("/")  # the search box takes the focus
    assert browser.switch_to.active_element.get_attribute("id") == "query"
    browser.switch_to.active_element.send_keys("a photo of a sneaker", Keys.ENTER)
    # every row's thumbnail but escape.png's (its symlink leads outside the dataset: refused, shown as refused)
    wait(browser, lambda d: loaded_images(d, "#results .result img") >= 20, "the result thumbnails")
    broken = browser.find_elements(By.CSS_SELECTOR, "#results .result:has(img.broken)")
    assert [b.get_attribute("data-path") for b in broken] in ([], ["train/bag/escape.png"])
    assert "results for “a photo of a sneaker”" in browser.find_element(By.ID, "status").text
    shoot(browser, tmp_path, "explore-search.png")

    first = browser.find_elements(By.CSS_SELECTOR, "#results .result")[0].get_attribute("data-path")
    browser.find_elements(By.CSS_SELECTOR, "#results .more-like-this")[0].click()
    wait(browser, lambda d: f"images like {first}" in d.find_element(By.ID, "status").text, "more like this")
    wait(browser, lambda d: loaded_images(d, "#results .result img") > 0, "its thumbnails")
    paths = [e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, "#results .result")]
    assert first not in paths and len(paths) == 24

    browser.find_elements(By.CSS_SELECTOR, "#results .result")[0].click()
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("data-index") == "1"

    target = min((explored["root"] / "valid" / "trouser").iterdir())
    upload = browser.find_element(By.ID, "upload")
    upload.send_keys(str(target))
    wait(browser, lambda d: f"for {target.name}" in d.find_element(By.ID, "status").text, "the upload's results")
    top = browser.find_elements(By.CSS_SELECTOR, "#results .result")[0]
    assert top.get_attribute("data-path") == f"valid/trouser/{target.name}"


def test_report_page_and_duplicates(browser, app_url, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(app_url + "/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "the page")
    browser.find_element(By.ID, "nav-validation").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#per-class tr.class-row")) == 6, "the classes")
    header = browser.find_element(By.CSS_SELECTOR, "#per-class th[data-key=label]")
    header.click()  # sort by class name
    labels = [r.get_attribute("data-label") for r in browser.find_elements(By.CSS_SELECTOR, "tr.class-row")]
    assert labels == sorted(labels)
    browser.find_element(By.CSS_SELECTOR, "#per-class th[data-key=top1]").click()  # worst first
    worst = browser.find_elements(By.CSS_SELECTOR, "tr.class-row")[0]
    label = worst.get_attribute("data-label")
    worst.click()
    wait(browser, lambda d: d.find_elements(By.ID, "misclassified"), "the class's misclassified images")
    heading = browser.find_element(By.CSS_SELECTOR, "#misclassified h3").text
    assert heading.startswith(f"{label}: ")
    assert browser.find_elements(By.CSS_SELECTOR, "#misclassified .miss")  # the tiny model confuses some
    wait(browser, lambda d: loaded_images(d, "#misclassified img") > 0, "their thumbnails")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".miss:first-child .neighbours figure")) in (0, 3)
    predicted = browser.find_element(By.CSS_SELECTOR, "#misclassified .prediction").text
    assert predicted and predicted != label
    shoot(browser, tmp_path, "explore-report.png")
    browser.find_element(By.ID, "nav-duplicates").click()
    wait(browser, lambda d: loaded_images(d, "#pairs img") > 0, "the duplicate pairs")
    assert "pairs at cosine" in browser.find_element(By.ID, "dup-summary").text
