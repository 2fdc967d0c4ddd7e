"""The playground page at `/`, driven in headless Chromium (Debian's, via Playwright) against a live server.

Playwright never downloads a browser here: it launches `/usr/bin/chromium` (scripts/install_chromium).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from server.testing import LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Request

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 120_000  # the first request on a fresh worker may take a while
API_KEY = "playground-test-key"


def browser_available() -> bool:
    """Whether the browser test can run; in CI it must."""
    missing = [
        what
        for what, present in (
            ("the playwright package", importlib.util.find_spec("playwright") is not None),
            (str(CHROMIUM), CHROMIUM.is_file()),
        )
        if not present
    ]
    if not missing:
        return True
    if os.environ.get("CI"):
        pytest.fail(
            f"CI must run the playground test; missing {', '.join(missing)} (scripts/install_chromium)"
        )
    return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not browser_available():
        pytest.skip(
            "needs the playwright package and Chromium at /usr/bin/chromium (scripts/install_chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def open_page(browser: Browser, server: LiveServer) -> Iterator[Page]:
    """The playground in a fresh browser context (so a fresh sessionStorage); fails on JavaScript errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.url}/")
    page.wait_for_selector("#gen-form")
    try:
        yield page
        assert errors == [], f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    with open_page(browser, live_server) as page:
        yield page


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[LiveServer]:
    """A live server that needs `Authorization: Key <API_KEY>` on every fal route and file."""
    env = {"FLUX2_CACHE_DIR": str(cache_dir), "FLUX2_SSE_PING_SECONDS": "1", "FLUX2_API_KEYS": API_KEY}
    with LiveServer(tmp_path_factory.mktemp("keyed"), "--model", "tiny", env=env) as server:
        yield server


def first_image_size(page: Page) -> list[int]:
    """Waits until the first result image has loaded; its natural [width, height]."""
    page.wait_for_function(
        "() => { const img = document.querySelector('#result-image-0');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )
    size: list[int] = page.eval_on_selector("#result-image-0", "img => [img.naturalWidth, img.naturalHeight]")
    return size


def submitted_input(page: Page) -> dict[str, Any]:
    """Clicks Generate and returns the JSON body the page posted to the queue."""
    with page.expect_request(lambda r: r.method == "POST" and "/queue/fal-ai/flux-2/lora" in r.url) as req:
        page.click("#submit")
    body: dict[str, Any] = req.value.post_data_json
    return body


def test_generate_an_image(page: Page, tmp_path: Path) -> None:
    page.fill("#prompt", "a lighthouse at dusk")
    page.select_option("#image-size", "square")
    page.fill("#steps", "4")
    page.fill("#seed", "5")
    sent = submitted_input(page)
    assert sent == {
        "prompt": "a lighthouse at dusk",
        "image_size": "square",
        "num_inference_steps": 4,
        "guidance_scale": 2.5,
        "num_images": 1,
        "acceleration": "regular",
        "output_format": "png",
        "loras": [],
        "seed": 5,
    }
    assert page.is_enabled("#cancel")

    assert first_image_size(page) == [512, 512]
    assert page.text_content("#progress-text") == "step 4/4"
    assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [4, 4]
    assert page.text_content("#result-seed") == "5"
    assert re.fullmatch(r"\d+\.\d\d s", page.text_content("#result-time") or "")
    assert (page.text_content("#status") or "").startswith("Done")
    assert page.is_hidden("#error")
    assert page.is_disabled("#cancel") and page.is_enabled("#submit")
    assert "step 1/4" in (page.text_content("#logs") or "")

    screenshot = tmp_path / "playground.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.is_file() and screenshot.stat().st_size > 0


def test_edit_with_a_reference_image(page: Page, tmp_path: Path, live_server: LiveServer) -> None:
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (200, 150), (30, 120, 200)).save(photo)
    page.fill("#prompt", "make it red")
    page.fill("#steps", "4")
    page.set_input_files("#references", str(photo))
    page.wait_for_selector("#remove-reference-0")
    assert page.input_value("#image-size") == "auto"  # an edit takes the reference's size by default
    sent = submitted_input(page)
    assert "image_size" not in sent
    (url,) = sent["image_urls"]
    assert url.startswith(f"{live_server.url}/files/")  # uploaded first, as fal's JS client does
    assert first_image_size(page) == [192, 144]  # 200x150 floored to multiples of 16
    page.click("#remove-reference-0")  # back to text-to-image, with a size again
    assert page.input_value("#image-size") == "landscape_4_3"
    assert page.query_selector_all("#reference-list li") == []


def test_a_lora_that_cannot_be_fetched_names_its_field(page: Page) -> None:
    page.fill("#prompt", "a red bicycle")
    page.select_option("#image-size", "square")
    page.fill("#steps", "4")
    page.click("#add-lora")
    page.click("#add-lora")
    page.click("#remove-lora-0")  # the rows renumber: one is left, #lora-path-0
    page.fill("#lora-path-0", "http://127.0.0.1:1/nothing.safetensors")
    page.fill("#lora-scale-0", "0.5")
    sent = submitted_input(page)
    assert sent["loras"] == [{"path": "http://127.0.0.1:1/nothing.safetensors", "scale": 0.5}]

    page.wait_for_selector("#error", state="visible")
    message = page.text_content("#error") or ""
    assert "(422)" in message and "loras.0.path: " in message, message
    assert page.get_attribute("#lora-path-0", "aria-invalid") == "true"
    assert page.text_content("#status") == "Failed."
    assert page.query_selector_all("#images img") == []
    assert page.is_enabled("#submit") and page.is_disabled("#cancel")


def test_an_out_of_range_input_shows_the_servers_message(page: Page) -> None:
    page.fill("#prompt", "a red bicycle")
    # Past the browser's own bounds check, as a hand-edited request would be.
    page.eval_on_selector("#gen-form", "form => { form.noValidate = true; }")
    page.fill("#steps", "1000")
    assert submitted_input(page)["num_inference_steps"] == 1000

    page.wait_for_selector("#error", state="visible")
    message = page.text_content("#error") or ""
    assert "num_inference_steps: Input should be less than or equal to 50" in message, message
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    page.fill("#steps", "4")  # editing the field clears its mark
    assert page.get_attribute("#steps", "aria-invalid") is None


def test_cancel_a_running_request(page: Page) -> None:
    page.fill("#prompt", "a slow one")
    page.select_option("#image-size", "square_hd")
    page.fill("#steps", "50")
    submitted_input(page)
    page.wait_for_function(
        "() => /^step [1-9]\\d*\\/50$/.test(document.querySelector('#progress-text').textContent)"
    )
    page.click("#cancel")

    page.wait_for_function("() => document.querySelector('#status').textContent === 'Cancelled.'")
    assert page.is_hidden("#error")
    assert page.query_selector_all("#images img") == []
    assert page.text_content("#progress-text") != "step 50/50"
    assert page.is_enabled("#submit") and page.is_disabled("#cancel")


def test_a_server_with_api_keys(browser: Browser, keyed_server: LiveServer) -> None:
    with open_page(browser, keyed_server) as page:
        assert page.get_attribute("#api-key", "type") == "password"
        assert page.get_attribute("#api-key", "autocomplete") == "off"
        page.fill("#prompt", "a lighthouse at dusk")
        page.select_option("#image-size", "square")
        page.fill("#steps", "4")

        # No key: the submit's 401 becomes a plain message.
        page.click("#submit")
        page.wait_for_selector("#error", state="visible")
        assert "The server needs an API key" in (page.text_content("#error") or "")
        assert page.get_attribute("#api-key", "aria-invalid") == "true"
        assert page.text_content("#status") == "Failed."
        assert page.is_enabled("#submit") and page.is_disabled("#cancel")

        # A wrong key: refused as well, in other words.
        page.fill("#api-key", "not-the-key")
        page.click("#submit")
        page.wait_for_function("() => /not accepted/.test(document.querySelector('#error').textContent)")
        assert "This API key is not accepted" in (page.text_content("#error") or "")
        assert page.text_content("#status") == "Failed."

        # The right key: kept in sessionStorage, so it survives a reload.
        page.fill("#api-key", API_KEY)
        page.reload()
        page.wait_for_selector("#gen-form")
        assert page.input_value("#api-key") == API_KEY
        assert page.evaluate("() => sessionStorage.getItem('flux2-playground-api-key')") == API_KEY
        page.fill("#prompt", "a lighthouse at dusk")
        page.select_option("#image-size", "square")
        page.fill("#steps", "4")

        requests: list[Request] = []
        page.on("request", lambda request: requests.append(request))
        # Every step the progress text shows, as it shows it (several may arrive in one event).
        page.evaluate(
            """() => {
                window.stepsSeen = [];
                new MutationObserver((records) => {
                    for (const record of records) {
                        for (const node of record.addedNodes) window.stepsSeen.push(node.textContent);
                    }
                }).observe(document.querySelector('#progress-text'), {childList: true});
            }"""
        )
        page.click("#submit")
        assert first_image_size(page) == [512, 512]
        assert (page.get_attribute("#result-image-0", "src") or "").startswith("blob:")
        assert page.eval_on_selector("#images a", "a => a.href").startswith("blob:")
        assert page.evaluate("() => window.stepsSeen") == [f"step {n}/4" for n in range(1, 5)]
        assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [4, 4]
        assert "step 1/4" in (page.text_content("#logs") or "")
        assert (page.text_content("#status") or "").startswith("Done")
        assert page.is_hidden("#error")

        # Each call to the server carried the key, the stream and the image included; no URL did.
        for request in requests:
            assert API_KEY not in request.url
            if request.url.startswith(keyed_server.url):
                assert request.all_headers().get("authorization") == f"Key {API_KEY}", request.url
        assert any("/status/stream" in r.url for r in requests)
        assert any("/files/" in r.url for r in requests)
