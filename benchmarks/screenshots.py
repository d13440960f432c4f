"""Phone-sized screenshots of the demo, taken by Debian's chromium driven by Playwright:

    python benchmarks/screenshots.py --model demo/model --out docs/img

Needs the `playwright` Python package (dev extra) and /usr/bin/chromium (tests/demo/install_browser.sh);
never `playwright install`, which downloads its own browser build. Writes demo-scan.png (a classified
photo), demo-backoff.png, demo-picker.png and demo-log.png.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = os.environ.get("HIERFG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PHONE = {"width": 412, "height": 915}


def launch_chromium(playwright):
    """The system chromium under Playwright, with nothing that phones home."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: run tests/demo/install_browser.sh "
                                "(Debian's chromium; set HIERFG_CHROMIUM to use another)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def phone_page(browser, base_url: str, station: str = "dock-3", operator: str = "ana", token: str = ""):
    """A phone-sized page with the station / operator ids already in localStorage."""
    ctx = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    ctx.add_init_script(
        f"localStorage.setItem('hierfg.station', {station!r}); localStorage.setItem('hierfg.operator', {operator!r});"
        + (f"localStorage.setItem('hierfg.token', {token!r});" if token else ""))
    page = ctx.new_page()
    page.goto(base_url + "/")
    return page


def scan(page, photo: Path) -> None:
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#result:not(.hidden)", timeout=60_000)


@contextlib.contextmanager
def _serving(model: str, data_dir: Path) -> Iterator[str]:
    """The demo on a free local port for the block; yields its URL."""
    from demo.app import DemoServer, open_demo

    app, store = open_demo(model, data_dir)
    try:
        with DemoServer(app) as server:
            yield server.url
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    from demo.app import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python benchmarks/screenshots.py", description="Screenshots of the demo page.")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--backoff-model", help="a model folder whose calibrated thresholds make --backoff-photo back off "
                                           "(default: --model)")
    p.add_argument("--data", default=os.environ.get("HIERFG_GROCERY",
                                                    str(ROOT.parent / "shared/datasets/grocery-store")))
    p.add_argument("--photo", default="val/Fruit/Melon/Galia-Melon/Galia-Melon_005.jpg")
    p.add_argument("--backoff-photo", default="val/Packages/Juice/God-Morgon-Orange-Juice/God-Morgon-Orange-Juice_004.jpg")
    p.add_argument("--out", default="docs/img")
    a = p.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(a.data)
    with tempfile.TemporaryDirectory(prefix="demo-shots-") as tmp, sync_playwright() as pw:
        browser = launch_chromium(pw)
        with _serving(a.model, Path(tmp) / "a") as url:
            page = phone_page(browser, url)
            scan(page, data / a.photo)
            page.screenshot(path=str(out / "demo-scan.png"))
            page.click("#correct")
            page.wait_for_selector("#picker[open]")
            page.screenshot(path=str(out / "demo-picker.png"))
            page.click("#picker-close")
            page.click("#confirm")
            page.wait_for_selector("#done:not(.hidden)")
            page.goto(url + "/scans")
            page.wait_for_selector(".scan-row img[src^='blob:']")
            page.screenshot(path=str(out / "demo-log.png"))
        with _serving(a.backoff_model or a.model, Path(tmp) / "b") as url:
            page = phone_page(browser, url)
            scan(page, data / a.backoff_photo)
            page.screenshot(path=str(out / "demo-backoff.png"))
        browser.close()
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('demo-*.png')))} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
