"""The page at / in a real headless Chromium (selenium): type, generate, the <audio> element
plays more than 0.5 s of streamed audio, the download link is set, no console error.

Needs `chromium` + `chromium-driver` (scripts/install_browser.sh) and `pip install
selenium`; skipped cleanly without them."""
import shutil
import time

import pytest

from serve_helpers import export_tiny, live_server

webdriver = pytest.importorskip("selenium.webdriver")
CHROME = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
    "google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROME and DRIVER),
                                reason="chromium / chromedriver not installed "
                                       "(scripts/install_browser.sh)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as ChromeService

    from calm_fast.serve.models import load_synth
    from calm_fast.serve.server import ServerConfig, create_app

    paths = export_tiny(tmp_path_factory.mktemp("page_models"))
    synth = load_synth(paths["lm"], vae=paths["vae"])
    # 16 kHz out: browsers' decoders want >= 3 kHz (the tiny VAE makes 1.6 kHz)
    app = create_app(synth, ServerConfig(max_seconds=1.5, eos_threshold=None,
                                         sample_rate=16000, max_streams=2))
    opts = Options()
    opts.binary_location = CHROME
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--autoplay-policy=no-user-gesture-required", "--mute-audio",
              "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with live_server(app) as port:
        drv = webdriver.Chrome(service=ChromeService(DRIVER), options=opts)
        drv.set_page_load_timeout(30)
        try:
            yield drv, port
        finally:
            drv.quit()


def test_type_generate_and_play(page):
    from selenium.webdriver.common.by import By

    drv, port = page
    drv.get(f"http://127.0.0.1:{port}/")
    box = drv.find_element(By.ID, "text")
    box.clear()
    box.send_keys("Hello from the browser. This is a second sentence. And a third one.")
    assert drv.find_element(By.ID, "voice").tag_name == "select"
    assert drv.find_element(By.ID, "upload").get_attribute("type") == "file"
    drv.find_element(By.ID, "generate").click()
    t0 = time.monotonic()
    played = 0.0
    while time.monotonic() - t0 < 30:
        played = drv.execute_script(
            "const a = document.getElementById('player');"
            "let s = 0; for (let i = 0; i < a.played.length; i++)"
            " s += a.played.end(i) - a.played.start(i); return s;")
        if played > 0.5:
            break
        time.sleep(0.2)
    err = drv.execute_script("const a = document.getElementById('player');"
                             "return a.error ? a.error.code + ' ' + a.error.message : null;")
    assert played > 0.5, (played, err, drv.find_element(By.ID, "status").text)
    href = drv.find_element(By.ID, "download").get_attribute("href")
    assert "/v1/audio/speech?" in href and "seed=" in href
    logs = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    assert not logs, logs
