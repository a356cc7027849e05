"""The interactive HTML view in a real headless browser (Debian's chromium + chromedriver).

Skipped, with the reason, where chromium, chromedriver or selenium is missing; CI
installs them (.ci/run). The page is opened from a file:// URL: nothing is served
and nothing is fetched.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time

import numpy as np
import pytest
import torch

import scalr_zoo
from scalr_zoo import viz

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WIDTH, HEIGHT = 1000, 700

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed (apt-get install chromium-driver)"),
]


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="scalr-zoo-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The sample scan with features of a small random network, as an HTML view."""
    scan = scalr_zoo.sample_scan()
    torch.manual_seed(0)
    model = scalr_zoo.create_model({"width": 48, "depth": 3, "head": "none", "sensor": scan.sensor})
    features = model.extract(scan.points).numpy()
    legend = {name: viz.LABEL_PALETTE[i] for i, name in enumerate(scan.label_names)}
    path = viz.save_html(
        tmp_path_factory.mktemp("html") / "scan.html", scan.points, features=features,
        colors={"labels": viz.label_colors(scan.labels)}, legend=legend, title="sample scan",
    )
    return path, features


def screenshot(driver) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))


def wait_for(driver, script: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def errors_logged(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def point_pixels(image: np.ndarray) -> np.ndarray:
    """Mask of pixels showing points: not the page background (#10100f-ish) nor the panel (left top)."""
    mask = np.abs(image.astype(int) - [16, 15, 20]).sum(axis=2) > 30
    mask[:330, :340] = False  # the info panel
    return mask


def test_page_loads_without_errors_and_shows_coloured_points(browser, scene):
    path, _ = scene
    browser.get(path.as_uri())
    assert wait_for(browser, "return window.scalrViewer && window.scalrViewer.ready")
    assert errors_logged(browser) == []
    assert browser.execute_script("return scalrViewer.count") == len(scalr_zoo.sample_scan())
    assert browser.execute_script("return scalrViewer.mode") == "PCA"
    image = screenshot(browser)
    assert image.shape == (HEIGHT, WIDTH, 3)
    points = point_pixels(image)
    assert points.mean() > 0.1  # a good part of the window shows points
    colours = {tuple(c) for c in (image[points] // 8)}  # distinct colours, quantised to 32 levels
    assert len(colours) > 300
    # the points are drawn in their exact PCA colours (the renderer does not blend)
    pca = {tuple(c) for c in viz.pca_colors(scene[1])}
    assert np.mean([tuple(p) in pca for p in image[points][::5]]) > 0.95


def test_click_recolours_by_similarity_to_the_clicked_point(browser, scene):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path, features = scene
    browser.get(path.as_uri())
    wait_for(browser, "return window.scalrViewer && window.scalrViewer.ready")
    before = screenshot(browser)
    # a pixel that shows a point, near the middle of the window
    ys, xs = np.nonzero(point_pixels(before))
    order = np.argsort((xs - WIDTH * 0.55) ** 2 + (ys - HEIGHT * 0.6) ** 2)
    x, y = next((int(xs[i]), int(ys[i])) for i in order if browser.execute_script(
        "return scalrViewer.pick(arguments[0], arguments[1])", int(xs[i]), int(ys[i])) >= 0)
    expected = browser.execute_script("return scalrViewer.pick(arguments[0], arguments[1])", x, y)
    frames = browser.execute_script("return scalrViewer.frames")
    canvas = browser.find_element(By.ID, "view")
    ActionChains(browser).move_to_element_with_offset(canvas, x - WIDTH // 2, y - HEIGHT // 2).click().perform()
    wait_for(browser, f"return scalrViewer.frames > {frames}")
    assert browser.execute_script("return scalrViewer.queryIndex") == expected
    assert browser.execute_script("return scalrViewer.mode") == "similarity"
    after = screenshot(browser)
    shown = point_pixels(before) | point_pixels(after)
    changed = np.abs(after.astype(int) - before).sum(axis=2) > 40
    assert changed[shown].mean() > 0.5
    # the page's similarity (int8, 32 dims) follows the exact cosine of the full features
    sample = np.random.default_rng(0).choice(len(features), 3000, replace=False).tolist()
    in_page = np.array(browser.execute_script("return scalrViewer.similarityOf(arguments[0])", sample))
    exact = viz.similarity(features, expected)[sample]
    assert np.corrcoef(in_page, exact)[0, 1] > 0.99
    assert np.abs(in_page - exact).max() < 0.05
    # Esc goes back to the PCA colours, pixel for pixel
    from selenium.webdriver.common.keys import Keys

    frames = browser.execute_script("return scalrViewer.frames")
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()
    wait_for(browser, f"return scalrViewer.frames > {frames}")
    assert browser.execute_script("return scalrViewer.mode") == "PCA"
    np.testing.assert_array_equal(screenshot(browser), before)
    assert errors_logged(browser) == []


def test_drag_orbits_and_buttons_switch_colourings(browser, scene):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path, _ = scene
    browser.get(path.as_uri())
    wait_for(browser, "return window.scalrViewer && window.scalrViewer.ready")
    before = screenshot(browser)
    frames = browser.execute_script("return scalrViewer.frames")
    canvas = browser.find_element(By.ID, "view")
    ActionChains(browser).move_to_element_with_offset(canvas, 100, 50).click_and_hold().move_by_offset(120, 40) \
        .release().perform()
    wait_for(browser, f"return scalrViewer.frames > {frames}")
    assert browser.execute_script("return scalrViewer.queryIndex") == -1  # a drag is not a click
    rotated = screenshot(browser)
    assert (np.abs(rotated.astype(int) - before).sum(axis=2) > 40).mean() > 0.05
    frames = browser.execute_script("return scalrViewer.frames")
    browser.find_element(By.XPATH, "//div[@id='modes']/button[text()='labels']").click()
    wait_for(browser, f"return scalrViewer.frames > {frames}")
    assert browser.execute_script("return scalrViewer.mode") == "labels"
    labelled = screenshot(browser)
    palette = {tuple(c) for c in viz.LABEL_PALETTE[: len(scalr_zoo.sample_scan().label_names)]}
    pixels = labelled[point_pixels(labelled)]
    assert np.mean([tuple(p) in palette for p in pixels[::5]]) > 0.95  # points drawn in the class colours
    assert errors_logged(browser) == []
