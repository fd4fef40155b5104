"""The Gradio UI in a real browser: Debian's chromium driven by Playwright.

CI needs ``apt-get install -y chromium`` and ``pip install playwright`` (Playwright cannot
download its own browser here, so the system chromium is launched directly).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from webui_fixtures import SIZE, make_home

from fastsd.webui import infotext, start

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


def test_ui_generates_into_gallery(tmp_path, tiny_sd1):
    sync_api = pytest.importorskip("playwright.sync_api")
    root = make_home(tmp_path / "home", tiny_sd1)
    server = start(home=root, port=0, quiet=True, ui_defaults={**SIZE, "sampler_name": "Euler"})
    with server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server.url + "/", timeout=60_000)
            page.locator("#txt2img_prompt textarea").fill("a photo of a red dog")
            page.locator("#txt2img_generate").click()
            image = page.locator("#txt2img_gallery img").first
            image.wait_for(state="visible", timeout=120_000)
            page.wait_for_function(
                "() => document.querySelector('#txt2img_info textarea')?.value.includes('Seed:')", timeout=60_000
            )
            shot = os.environ.get("FASTSD_UI_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)
            text = page.locator("#txt2img_info textarea").input_value()
        finally:
            browser.close()
    assert text.startswith("a photo of a red dog\nSteps: 2, Sampler: Euler")
    saved = sorted((root / "outputs").glob("*/*.png"))
    assert len(saved) == 1 and infotext.read_parameters(saved[0]) == text
