"""The viewer page (``GET /``): served with a strict policy, and driven in headless Chromium against a live
service (``python -m service.main`` on loopback, the shipped model).

The browser tests need Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; they skip
with the reason where one is missing (``.ci/run`` installs them). What they check is what the page shows
against what the API answers for the same photo: the outline read back from ``<canvas id="overlay">``, the
area, the error messages, the API-key flow, and that nothing leaves this origin.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy import ndimage

from bench.http_load import ServiceConfig, ServiceProcess
from service.config import DEFAULT_MODEL_PATH, Settings
from service.main import create_app
from service.routes.viewer import ASSET_PREFIX, ASSETS, CONTENT_SECURITY_POLICY
from tests.conftest import SHARED_DATA, make_lesion

REPO = Path(__file__).resolve().parents[1]
#: Screenshots, as test artifacts (runs/ is not committed).
ARTIFACTS = REPO / "runs" / "viewer"
#: Real sample photos (JPEG from ISIC, BMP from PH2): the README's picture is the PH2 one's screenshot.
REAL_PHOTOS = {"ISIC_0009995.jpg": "image/jpeg", "IMD003.bmp": "image/bmp"}
SAMPLES = SHARED_DATA / "samples" / "images"
API_KEY = "viewer-test-key-5f1c"
#: The keyed service's byte limit: small, so that a 413 is cheap to provoke.
KEYED_UPLOAD_LIMIT = 400_000
#: The outline's colour on #overlay (viewer.js OUTLINE_RGB).
OUTLINE_RGB = (0, 224, 255)
CONTROLS = (
    "photo",
    "threshold",
    "threshold-reset",
    "flip-tta",
    "largest-component",
    "fill-holes",
    "pixel-spacing",
    "show-outline",
    "show-heat",
    "download",
)


# --- the page as served (no browser) ---------------------------------------------------------------


def test_page_and_assets_are_served_from_this_origin_with_a_strict_policy() -> None:
    client = TestClient(create_app(Settings()))
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "connect-src 'self'" in CONTENT_SECURITY_POLICY
    assert page.headers["x-frame-options"] == "DENY"
    for element in ('<input type="file" id="photo"', '<canvas id="overlay"', 'id="area"', 'id="api-key"'):
        assert element in page.text
    # Every file the page names is one of ours, under /viewer/; no inline script or style.
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert referenced and all(url.startswith(ASSET_PREFIX) for url in referenced), referenced
    assert "<script>" not in page.text and "style=" not in page.text
    for name, media_type in ASSETS.items():
        asset = client.get(ASSET_PREFIX + name)
        assert asset.status_code == 200
        assert asset.headers["content-type"] == media_type
    script = client.get(ASSET_PREFIX + "viewer.js").text
    assert not re.search(r"localStorage|sessionStorage|indexedDB|document\.cookie", script)
    assert "http://" not in script and "https://" not in script


def test_the_viewer_can_be_turned_off() -> None:
    client = TestClient(create_app(Settings(viewer=False)))
    for path in ("/", ASSET_PREFIX + "viewer.js"):
        answer = client.get(path)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"


def test_the_page_is_open_when_api_keys_guard_segment() -> None:
    client = TestClient(create_app(Settings(api_keys=[API_KEY])))
    assert client.get("/").status_code == 200
    assert client.get(ASSET_PREFIX + "viewer.js").status_code == 200
    assert client.post("/segment", files={"file": ("a.png", b"x", "image/png")}).status_code == 401


def test_the_viewer_is_left_out_of_the_api_contract() -> None:
    contract = json.loads((REPO / "openapi" / "openapi.json").read_text())
    assert "/" not in contract["paths"]
    assert not any(path.startswith(ASSET_PREFIX) for path in contract["paths"])


# --- in headless Chromium --------------------------------------------------------------------------


def _browser_missing() -> str | None:
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium with its console and network logs kept."""
    reason = _browser_missing()
    if reason:
        pytest.skip(f"no browser for the viewer tests: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1360,900",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(shutil.which("chromedriver"))), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _start(tmp_path: Path, name: str, **settings: str) -> ServiceProcess:
    config = ServiceConfig(name, tuple(settings.items()))
    service = ServiceProcess(DEFAULT_MODEL_PATH, config, tmp_path / f"{name}.log")
    service.start()
    return service


@pytest.fixture(scope="module")
def service(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The shipped model, default settings (no keys)."""
    live = _start(tmp_path_factory.mktemp("viewer"), "viewer")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_service(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The shipped model behind an API key, with a small upload limit."""
    live = _start(
        tmp_path_factory.mktemp("viewer-keyed"),
        "viewer-keyed",
        api_keys=API_KEY,
        max_upload_bytes=str(KEYED_UPLOAD_LIMIT),
    )
    yield live
    live.stop()


@dataclass(frozen=True)
class Photo:
    path: Path
    media_type: str


@pytest.fixture(scope="module")
def synthetic_photo(tmp_path_factory: pytest.TempPathFactory) -> Photo:
    """A generated dermoscopy-like photo (a dark ellipse on skin), so the core test needs no data."""
    image, _ = make_lesion((360, 480), seed=11)
    path = tmp_path_factory.mktemp("photos") / "synthetic-lesion.png"
    Image.fromarray(image).save(path)
    return Photo(path, "image/png")


def _real_photo(name: str) -> Photo:
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"real sample photo not found at {path} (../shared/data beside the checkout)")
    return Photo(path, REAL_PHOTOS[name])


def _wait(driver: Any, condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; page state {_state(driver)!r}")
        time.sleep(0.05)


def _state(driver: Any) -> str:
    return str(driver.execute_script("return document.body.dataset.state"))


def _text(driver: Any, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element_id}').textContent")).strip()


def _open(driver: Any, service: ServiceProcess) -> None:
    driver.get(service.url + "/")
    _wait(driver, lambda: "·" in _text(driver, "service-status"), "the readiness line")


# Counts the page's state changes, so that an upload's answer is never mistaken for the state before it
# (on a busy machine the page may not have left "done" yet when the first check runs).
_COUNT_STATE_CHANGES = """
if (!window.stateChanges) {
  window.stateChanges = {count: 0};
  new MutationObserver(() => { window.stateChanges.count += 1; })
    .observe(document.body, {attributes: true, attributeFilter: ["data-state"]});
}
window.stateChanges.count = 0;
"""


def _upload(driver: Any, photo: Path) -> str:
    """Chooses ``photo`` in the file picker; waits for the page to answer it and returns its state."""
    from selenium.webdriver.common.by import By

    driver.execute_script(_COUNT_STATE_CHANGES)
    driver.find_element(By.ID, "photo").send_keys(str(photo))
    _wait(
        driver,
        lambda: (
            driver.execute_script("return window.stateChanges.count") > 0
            and _state(driver) not in ("idle", "busy")
        ),
        "the answer",
    )
    return _state(driver)


def _rerun(driver: Any, change: Callable[[], None]) -> None:
    """Changes an option and waits for the new answer (a new request id)."""
    before = _text(driver, "request-id")
    change()
    _wait(
        driver,
        lambda: _state(driver) == "done" and _text(driver, "request-id") != before,
        "the answer to the changed options",
    )


def _api(service: ServiceProcess, photo: Photo, headers: dict[str, str] | None = None, **query: str) -> Any:
    answer = httpx.post(
        service.url + "/segment",
        params=query,
        files={"file": (photo.path.name, photo.path.read_bytes(), photo.media_type)},
        headers=headers or {},
        timeout=60,
    )
    return answer


def _png(base64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(base64_png))))


def _canvas(driver: Any, canvas_id: str) -> np.ndarray:
    """The canvas's own pixels (RGBA, at the photo's resolution), read back through toDataURL."""
    url = driver.execute_script(f"return document.getElementById('{canvas_id}').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def expected_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Lesion pixels whose (2·width+1)² neighbourhood reaches the background or the photo's edge."""
    lesion = mask > 127
    core = ndimage.binary_erosion(lesion, structure=np.ones((2 * width + 1,) * 2, bool), border_value=0)
    return lesion & ~core


def _area_text(lesion: dict[str, Any]) -> str:
    text = f"{lesion['area_px']:,} px · {100 * lesion['area_fraction']:.1f} % of the photo"
    if lesion.get("area_mm2") is not None:
        text += f" · {lesion['area_mm2']:.2f} mm²"
    return text


def _check_against_api(driver: Any, answer: dict[str, Any]) -> None:
    """The outline on #overlay, the area, box and model are the API's for the same photo and options."""
    overlay = _canvas(driver, "overlay")
    height, width = answer["image"]["height"], answer["image"]["width"]
    assert overlay.shape == (height, width, 4)
    outline_width = int(
        driver.execute_script("return document.getElementById('overlay').dataset.outlineWidth")
    )
    assert outline_width >= 1
    wanted = expected_outline(_png(answer["mask_png"]), outline_width)
    drawn = overlay[..., 3] > 0
    assert wanted.any(), "the API found no lesion: nothing to compare"
    disagree = int((drawn != wanted).sum())
    assert disagree == 0, f"{disagree} of {int(wanted.sum())} outline pixels differ from the API's mask"
    assert (overlay[drawn][:, :3] == OUTLINE_RGB).all() and (overlay[drawn][:, 3] == 255).all()
    lesion = answer["lesion"]
    assert _text(driver, "area") == _area_text(lesion)
    box = lesion["bbox"]
    assert _text(driver, "bbox") == f"x {box['x']}, y {box['y']} · {box['width']} × {box['height']} px"
    assert _text(driver, "model") == f"{answer['model']['name']} {answer['model']['version']}"
    assert "total" in _text(driver, "timings")


def _screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path))
    assert Image.open(path).size[0] > 300
    return path


@pytest.mark.parametrize("source", ["synthetic", *REAL_PHOTOS])
def test_the_outline_drawn_is_the_api_mask_and_the_area_is_the_api_area(
    browser: Any, service: ServiceProcess, synthetic_photo: Photo, source: str
) -> None:
    photo = synthetic_photo if source == "synthetic" else _real_photo(source)
    _open(browser, service)
    assert _upload(browser, photo.path) == "done"
    answer = _api(service, photo)
    assert answer.status_code == 200
    _check_against_api(browser, answer.json())
    # The photo itself is drawn under the outline, at the same resolution.
    assert _canvas(browser, "image").shape[:2] == _canvas(browser, "overlay").shape[:2]
    _screenshot(browser, f"viewer-{Path(source).stem}.png")


def test_options_and_pixel_spacing_go_to_the_api(
    browser: Any, service: ServiceProcess, synthetic_photo: Photo
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _open(browser, service)
    assert _upload(browser, synthetic_photo.path) == "done"
    _rerun(browser, lambda: browser.find_element(By.ID, "pixel-spacing").send_keys("0.02"))
    # Keyboard only: focus the box and press space.
    _rerun(browser, lambda: browser.find_element(By.ID, "fill-holes").send_keys(Keys.SPACE))
    _rerun(browser, lambda: browser.find_element(By.ID, "largest-component").send_keys(Keys.SPACE))
    answer = _api(
        service, synthetic_photo, pixel_spacing_mm="0.02", fill_holes="true", largest_component="true"
    )
    body = answer.json()
    assert body["lesion"]["area_mm2"] is not None
    assert "mm²" in _text(browser, "area")
    _check_against_api(browser, body)
    # The heat overlay: shown on demand, drawn from the probability map (opaque only where confident).
    browser.find_element(By.ID, "show-heat").send_keys(Keys.SPACE)
    assert browser.find_element(By.ID, "heat").is_displayed()
    heat = _canvas(browser, "heat")[..., 3] > 0
    confident = _png(body["probability_png"]) >= 0.05 * 255
    assert heat.any() and not (heat & ~confident).any()


def test_a_dropped_photo_is_segmented(browser: Any, service: ServiceProcess, synthetic_photo: Photo) -> None:
    _open(browser, service)
    data = base64.b64encode(synthetic_photo.path.read_bytes()).decode()
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer }));
        """,
        data,
    )
    _wait(browser, lambda: _state(browser) not in ("idle", "busy"), "the dropped photo's answer")
    assert _state(browser) == "done"
    _check_against_api(browser, _api(service, synthetic_photo).json())


def test_a_non_image_shows_the_api_message(browser: Any, service: ServiceProcess, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a photo at all\n")
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.7\n1 0 obj << >> endobj\n%%EOF\n")
    for path, media_type, status in ((text, "text/plain", 400), (pdf, "application/pdf", 415)):
        _open(browser, service)
        assert _upload(browser, path) == "error"
        refused = _api(service, Photo(path, media_type))
        assert refused.status_code == status
        error = refused.json()["error"]
        shown = _text(browser, "error")
        assert error["message"] in shown and f"{status} {error['code']}" in shown
        if status == 415:
            assert "Accepted: JPEG, PNG, BMP or TIFF" in shown
        assert browser.execute_script("return document.getElementById('canvases').hidden")


def test_the_api_key_flow(browser: Any, keyed_service: ServiceProcess, synthetic_photo: Photo) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _open(browser, keyed_service)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    assert _upload(browser, synthetic_photo.path) == "needs-key"
    key_field = browser.find_element(By.ID, "api-key")
    assert key_field.is_displayed() and key_field.get_attribute("type") == "password"
    assert browser.switch_to.active_element == key_field
    # A wrong key: the API's message, still no result.
    key_field.send_keys("wrong-key", Keys.ENTER)
    refused = httpx.post(keyed_service.url + "/segment", headers={"X-API-Key": "wrong-key"}, timeout=30)
    _wait(browser, lambda: _text(browser, "key-message") != "", "the wrong key's message")
    assert _text(browser, "key-message") == refused.json()["error"]["message"]
    assert _state(browser) == "needs-key"
    # The right key: the outline, and the key is in no storage, cookie or URL.
    key_field.clear()
    key_field.send_keys(API_KEY, Keys.ENTER)
    _wait(browser, lambda: _state(browser) == "done", "the answer with the right key")
    _check_against_api(browser, _api(keyed_service, synthetic_photo, {"X-API-Key": API_KEY}).json())
    stored = browser.execute_script(
        "return [localStorage.length, sessionStorage.length, document.cookie, location.href]"
    )
    assert stored[:3] == [0, 0, ""] and API_KEY not in stored[3]
    # Over the byte limit: the API's message and the limit in words.
    big = synthetic_photo.path.with_name("big.bmp")
    Image.fromarray(make_lesion((400, 400), seed=3)[0]).save(big)  # 480 kB as BMP
    assert big.stat().st_size > KEYED_UPLOAD_LIMIT
    assert _upload(browser, big) == "error"
    too_large = _api(keyed_service, Photo(big, "image/bmp"), {"X-API-Key": API_KEY}).json()["error"]
    shown = _text(browser, "error")
    assert too_large["message"] in shown and "413 payload_too_large" in shown
    assert "(391 KiB at most)" in shown


def test_nothing_leaves_the_origin_and_the_console_stays_clean(
    browser: Any, service: ServiceProcess, synthetic_photo: Photo
) -> None:
    from selenium.webdriver.common.by import By

    browser.get_log("browser")  # drop what earlier tests left
    browser.get_log("performance")
    _open(browser, service)
    assert _upload(browser, synthetic_photo.path) == "done"
    browser.find_element(By.ID, "show-heat").click()
    browser.find_element(By.ID, "threshold-reset").click()
    _wait(browser, lambda: _state(browser) == "done", "the answer")
    requested = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
    assert any(url.endswith("/segment") for url in requested), requested
    foreign = [url for url in requested if not url.startswith((service.url + "/", "data:", "blob:"))]
    assert not foreign, f"requests to another origin: {foreign}"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"


def test_a_phone_sized_viewport_and_the_keyboard_reach_every_control(
    browser: Any, service: ServiceProcess, synthetic_photo: Photo
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.set_window_size(390, 844)
    try:
        _open(browser, service)
        assert _upload(browser, synthetic_photo.path) == "done"
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page is {overflow} px wider than a phone's viewport"
        stage_width = browser.execute_script("return document.getElementById('overlay').clientWidth")
        assert 200 < stage_width <= 390
        # The photo comes right after the picker, before the options.
        below_picker = browser.execute_script(
            "const top = (id) => document.getElementById(id).getBoundingClientRect().top;"
            "return [top('drop') < top('overlay'), top('overlay') < top('threshold')]"
        )
        assert below_picker == [True, True]
        browser.execute_script("document.getElementById('drop').scrollIntoView()")
        _screenshot(browser, "viewer-phone.png")
        browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        reached = []
        for _ in range(40):
            ActionChains(browser).send_keys(Keys.TAB).perform()
            reached.append(browser.execute_script("return document.activeElement.id"))
        missing = [control for control in CONTROLS if control not in reached]
        assert not missing, f"not reachable with Tab: {missing} (reached {reached})"
    finally:
        browser.set_window_size(1360, 900)


def test_the_quality_and_review_flag_are_the_apis(
    browser: Any, service: ServiceProcess, synthetic_photo: Photo, tmp_path: Path
) -> None:
    _open(browser, service)
    assert _upload(browser, synthetic_photo.path) == "done"
    quality = _api(service, synthetic_photo, outputs="").json()["quality"]
    assert not browser.execute_script("return document.getElementById('quality').hidden")
    assert _text(browser, "estimated-jaccard") == f"{quality['estimated_jaccard']:.2f}"
    assert quality["review_recommended"] is False
    assert "No review flag" in _text(browser, "review")
    assert _text(browser, "review-reasons") == ""

    # A photo with no lesion at all: flagged, with the API's reason.
    blank = Photo(tmp_path / "blank.png", "image/png")
    Image.fromarray(np.full((300, 400, 3), 190, np.uint8)).save(blank.path)
    flagged = _api(service, blank, outputs="").json()["quality"]
    assert flagged["review_recommended"] is True
    assert _upload(browser, blank.path) == "done"
    assert "Review recommended" in _text(browser, "review")
    assert _text(browser, "estimated-jaccard") == f"{flagged['estimated_jaccard']:.2f}"
    assert _text(browser, "review-reasons") == "".join(flagged["reasons"])
