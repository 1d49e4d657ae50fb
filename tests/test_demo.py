"""The Gradio demo (examples/space/app.py): its API through gradio_client on a tiny model, bad uploads, and the
whole page in a real headless Chromium on the committed checkpoint."""

import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_pipeline, needs_data

gr = pytest.importorskip("gradio")
sys.path.insert(0, str(ROOT / "examples" / "space"))
import app  # noqa: E402

pytestmark = [needs_data, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if os.environ.get("AMBISEG_REQUIRE_BROWSER") == "1" and not (BROWSER and DRIVER):
    raise RuntimeError("AMBISEG_REQUIRE_BROWSER=1 but chromium or chromedriver is missing")  # CI: never skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(pipe, nodules):
    demo = app.build_demo(pipe, nodules)
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


def test_api_endpoint_returns_the_metrics_of_the_direct_call(tokenizer):
    import httpx
    from gradio_client import Client

    from ambiseg_diffusers.lidc import load_lidc64

    pipe, mini = make_pipeline(tokenizer), load_lidc64("mini")
    demo, url = serve(pipe, mini)
    try:
        result = Client(url, verbose=False).predict(3, "a solid round nodule", 4, 2, 7, 1.0, 1.0,
                                                    api_name="/segment_nodule")
        # The server refuses an upload over the limit before any handler reads it.
        oversize = b"\0" * ((app.MAX_UPLOAD_MB * 2**20) + 1)
        refused = httpx.post(url + "gradio_api/upload", files={"files": ("slice.npy", oversize)}, timeout=60)
        accepted = httpx.post(url + "gradio_api/upload", files={"files": ("slice.npy", b"\0" * 128)}, timeout=60)
    finally:
        demo.close()
    *_, rows, out = app.segment(pipe, np.asarray(mini[3]["image"]), "a solid round nodule", 4, 2, 7,
                                raters=np.asarray(mini[3]["masks"]))
    assert result == {"metrics": dict(rows), "sample_foreground": float(out.masks.mean())}
    assert (refused.status_code, accepted.status_code) == (413, 200)
    assert "maximum allowed size of 16777216 bytes" in refused.text
    assert set(result["metrics"]) == {"ged", "ged_iou", "ci", "dmax", "sc", "da", "avg_dice", "avg_iou"}


def test_uploads_are_read_or_refused_with_a_message(tmp_path):
    np.save(tmp_path / "ok.npy", np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))
    assert app.read_upload(str(tmp_path / "ok.npy")).shape == (64, 64)
    np.save(tmp_path / "odd.npy", np.zeros((63, 96)))  # any size the processor takes: it resizes, masks come back
    assert app.read_upload(str(tmp_path / "odd.npy")).shape == (63, 96)
    np.save(tmp_path / "tiny.npy", np.zeros((8, 64)))
    (tmp_path / "notes.png").write_text("not an image")
    np.save(tmp_path / "rgb.npy", np.zeros((64, 64, 3)))
    for name, match in (("tiny.npy", "between 16 and"), ("notes.png", "Could not read notes.png"),
                        ("rgb.npy", "one 2-D grey image")):
        with pytest.raises(gr.Error, match=match):
            app.read_upload(str(tmp_path / name))
    # Refused before the data is read: a file over the limit (sparse: no 17 MB written), a header promising too much.
    with open(tmp_path / "huge.npy", "wb") as f:
        f.truncate((app.MAX_UPLOAD_MB + 1) * 2**20)
    with open(tmp_path / "claims.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (40000, 40000)})
    np.save(tmp_path / "words.npy", np.array([["a"] * 4] * 4))
    for name, match in (("huge.npy", "is 17.0 MB; uploads are limited to 16 MB"),
                        ("claims.npy", r"shape \(40000, 40000\); expected one 2-D grey image of at most 512x512"),
                        ("words.npy", "holds <U1 values")):
        with pytest.raises(gr.Error, match=match):
            app.read_upload(str(tmp_path / name))
    lowest = [app.rating_choices(n)[0] for n in app.RATING_NAMES]
    assert app.prompt_from_choices("short", 8.0, 120, *lowest).startswith("A ground-glass, linear nodule")
    assert app.prompt_from_choices("paper", 8.04, 120.4, *lowest).endswith(
        "The diameter is 8.0 mm. The volume is 120 mm3. Although there are descriptions of the concerned region, the "
        "requirement is to identify the segmentation boundaries.")


def drive(url: str, screenshot: Path) -> dict:
    """Picks the first nodule, sets its margin to "Poorly Defined", samples, and reads what the page shows."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(flag)
    options.binary_location = BROWSER
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(url)
        wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#nodules button.thumbnail-item"))).click()
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#input-image img")))
        margin = driver.find_element(By.CSS_SELECTOR, "#rating-margin input")
        margin.click()
        wait.until(ready.element_to_be_clickable(
            (By.XPATH, "//li[@role='option' and contains(., 'Poorly Defined') and not(contains(., 'Near'))]"))).click()
        wait.until(lambda d: "The Margin is Poorly Defined" in d.find_element(By.CSS_SELECTOR, "#prompt textarea")
                   .get_attribute("value"))
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value")
        started = time.time()
        driver.find_element(By.ID, "sample").click()
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#samples img")))
        wait.until(lambda d: "ged" in d.find_element(By.ID, "metrics").text)
        seconds = time.time() - started
        time.sleep(0.5)
        driver.set_window_size(1400, driver.execute_script("return document.body.scrollHeight") + 200)
        driver.save_screenshot(str(screenshot))
        return {"prompt": prompt, "metrics": driver.find_element(By.ID, "metrics").text, "seconds": seconds,
                "images": [img.get_attribute("src") for sel in ("#samples", "#mean", "#uncertainty")
                           for img in driver.find_elements(By.CSS_SELECTOR, f"{sel} img")]}
    finally:
        driver.quit()


@pytest.mark.skipif(not (BROWSER and DRIVER), reason="no chromium/chromedriver installed (apt-get install chromium "
                    "chromium-driver); .ci/run installs them")
def test_the_demo_in_a_real_browser(tmp_path):
    from ambiseg_diffusers import AmbiSegPipeline

    pipe = AmbiSegPipeline.from_pretrained(app.LOCAL_MODEL)
    demo, url = serve(pipe, app.load_nodules(None))
    try:
        seen = drive(url, tmp_path / "demo.png")
    finally:
        demo.close()
    assert "The Margin is Poorly Defined" in seen["prompt"]  # the model's own (paper) prompt style by default
    assert "ged" in seen["metrics"] and "avg_dice" in seen["metrics"]
    assert len(seen["images"]) == 3 and all(seen["images"])
    assert (tmp_path / "demo.png").stat().st_size > 50_000
    print(f"first sampling of 16 masks, click to table: {seen['seconds']:.1f} s")
    if os.environ.get("AMBISEG_DEMO_SCREENSHOT"):  # regenerate the README's picture
        shutil.copy(tmp_path / "demo.png", os.environ["AMBISEG_DEMO_SCREENSHOT"])
