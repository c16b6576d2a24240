"""The web page in headless Chromium (Debian's chromium and chromium-driver): upload a voice, speak, hear."""

from __future__ import annotations

import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from csm.audio import save_audio
from tests.product.conftest import speech_like


@pytest.fixture
def browser():
    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromedriver is missing: scripts/test installs Debian's chromium-driver"
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a browser of its own
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=900,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def test_the_page_uploads_a_voice_speaks_a_line_and_plays_it(server, browser, tmp_path):
    browser.get(f"{server.url}/")
    wait = WebDriverWait(browser, 240)
    wait.until(lambda driver: len(Select(driver.find_element(By.ID, "voice")).options) > 2)

    sample = tmp_path / "my-voice.wav"
    save_audio(sample, speech_like(0.6, seed=9), 24_000)
    browser.find_element(By.TAG_NAME, "details").click()
    form = browser.find_element(By.ID, "upload")
    form.find_element(By.NAME, "name").send_keys("Page voice")
    form.find_element(By.NAME, "audio_sample").send_keys(str(sample))
    form.find_element(By.NAME, "text").send_keys("What the sample says.")
    form.find_element(By.NAME, "consent").click()
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda driver: "added" in driver.find_element(By.ID, "status").text)
    assert Select(browser.find_element(By.ID, "voice")).first_selected_option.text == "Page voice (uploaded)"

    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys("Hello from the page.")
    browser.find_element(By.ID, "seed").send_keys("3")
    seconds = browser.find_element(By.ID, "max-seconds")
    seconds.clear()
    seconds.send_keys("0.48")
    browser.find_element(By.ID, "speak").click()
    wait.until(
        lambda driver: (
            driver.find_element(By.ID, "status").text.startswith(("Done", "HTTP"))
            or "error" in driver.find_element(By.ID, "status").get_attribute("class")
        )
    )
    assert browser.find_element(By.ID, "status").text == "Done: 0.48 s of audio"
    # The <audio> element holds the clip: loaded, and as long as what was spoken.
    wait.until(lambda driver: driver.execute_script("return document.getElementById('player').readyState") >= 1)
    duration = browser.execute_script("return document.getElementById('player').duration")
    assert duration == pytest.approx(0.48, abs=0.01)
    assert browser.find_element(By.ID, "download").is_displayed()
    screenshot = tmp_path / "page.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot of the page: {screenshot}")
    voice = Select(browser.find_element(By.ID, "voice")).first_selected_option.get_attribute("value")
    assert server.call("DELETE", f"/v1/audio/voices/{voice}")[0] == 200
