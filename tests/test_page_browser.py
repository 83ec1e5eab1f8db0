"""The explanation page in a real headless Chromium (Debian's chromium + chromium-driver)."""

import shutil
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_page_ranks_and_shows_heatmaps(served, planted, tmp_path):
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from rmbert.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "store"
    shutil.copytree(served / "store", store)
    app = create_app(served / "run", store, behaviors=planted / "dev" / "behaviors.tsv")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1300,1000",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#user option")) > 2)
        Select(driver.find_element(By.ID, "user")).select_by_index(2)
        assert driver.find_element(By.ID, "history").get_attribute("value").strip()
        driver.find_element(By.ID, "rank").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heat-history td.w"))
        ranked = driver.find_elements(By.CSS_SELECTOR, "#ranked li")
        assert len(ranked) >= 2
        assert len(driver.find_elements(By.CSS_SELECTOR, "#heat-title tr")) == 3  # one row per step (p=3)
        n_hist = len(driver.find_elements(By.CSS_SELECTOR, "#histlist li"))
        assert n_hist > 0 and len(driver.find_elements(By.CSS_SELECTOR, "#heat-history td.w")) == 3 * min(
            n_hist, 50
        )
        ranked[1].click()  # another candidate's explanation replaces the first
        wait.until(lambda d: ranked[1].get_attribute("class") == "sel")
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=10)
