"""The playground page at `/`, driven in headless Chromium (Debian's, via Playwright) against a live server.

Playwright never downloads a browser here: it launches `/usr/bin/chromium` (scripts/install_chromium).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.live import LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

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


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{live_server.url}/")
    page.wait_for_selector("#gen-form")
    try:
        yield page
        assert errors == [], f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


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

    page.wait_for_function(
        "() => { const img = document.querySelector('#result-image-0');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )
    assert page.eval_on_selector("#result-image-0", "img => [img.naturalWidth, img.naturalHeight]") == [
        512,
        512,
    ]
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
