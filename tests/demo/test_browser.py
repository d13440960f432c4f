"""A real browser (Debian's chromium, driven by Playwright) uses the page like an operator: upload a real
photo, read the breadcrumb, confirm or correct, and the row is in SQLite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.screenshots import CHROMIUM, launch_chromium, phone_page, scan

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def browser():
    # Skipping is allowed only on a developer machine without the browser; in CI it is a failure.
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright Python package is not installed (pip install -e '.[dev]')"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} is missing: run tests/demo/install_browser.sh"
    if missing:
        if IN_CI:
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as pw:
        b = launch_chromium(pw)
        yield b
        b.close()


@pytest.mark.slow
def test_upload_confirm_row_in_sqlite(db_rows, browser, start_demo, demo_classifier, banana_jpg):
    run = start_demo(demo_classifier)
    page = phone_page(browser, run.url, station="dock-7", operator="li")
    assert "dock-7" in page.inner_text("#who")
    scan(page, banana_jpg)
    want = demo_classifier.classify(banana_jpg)
    crumbs = page.locator("#breadcrumb li .crumb-label").all_inner_texts()
    assert crumbs == [p.label for p in want.path]
    confs = page.locator("#breadcrumb li .conf").all_inner_texts()
    assert len(confs) == len(crumbs) and all(c.endswith("%") for c in confs)
    assert page.inner_text("#headline") == want.path[-1].label
    page.click("#confirm")
    page.wait_for_selector("#done:not(.hidden)")
    assert page.inner_text("#done").startswith("✓ Confirmed")
    [row] = db_rows(run.db, "SELECT * FROM scans")
    assert (row["action"], row["station"], row["operator"]) == ("confirmed", "dock-7", "li")
    assert row["final_path"] == " > ".join(p.label for p in want.path)
    page.context.close()


@pytest.mark.slow
def test_token_prompt_and_tree_picker_correction(db_rows, browser, start_demo, demo_classifier, grocery_root):
    run = start_demo(demo_classifier, token="t0ken")
    page = phone_page(browser, run.url)
    # No token yet: the API answers 401 and the page opens Settings to ask for it.
    page.wait_for_selector("#settings[open]")
    assert "token" in page.inner_text("#message").lower()
    page.fill("#token", "t0ken")
    page.click("#settings-form button[type=submit]")
    page.wait_for_selector("#model-info:has-text('model ')")
    scan(page, grocery_root / "train/Fruit/Apple/Granny-Smith/Granny-Smith_001.jpg")
    page.click("#correct")
    page.wait_for_selector("#picker[open]")
    while page.is_enabled("#picker-back"):
        page.click("#picker-back")
    for name in ("Fruit", "Apple", "Granny-Smith"):
        page.click(f'#picker-list >> text="{name}"')  # exact text: "Apple" must not hit "Pineapple"
    page.wait_for_selector("#done:not(.hidden)")
    assert "Corrected to Fruit > Apple > Granny-Smith" in page.inner_text("#done")
    # A bad file shows the server's message on the page, and nothing is logged for it.
    page.set_input_files("#file", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"just text"}])
    page.wait_for_selector("#message.error")
    assert "not a usable image" in page.inner_text("#message")
    [row] = db_rows(run.db, "SELECT * FROM scans")
    assert (row["action"], row["final_path"], row["final_level"]) == ("corrected", "Fruit > Apple > Granny-Smith", 2)
    page.context.close()
