"""Render a canal report.html with headless Chromium to a PNG, to check the page by eye.

Not a test dependency: the test suite checks the page's content without a browser. Needs
Debian's ``chromium-headless-shell`` (or ``chromium``)::

    apt-get install -y chromium-headless-shell
    python tools/screenshot_report.py runs/demo/pancreas/report.html --out report.png

The page is loaded from disk with the network off (``--proxy-server`` to a dead port), so a
reference to an outside resource shows up as a missing image instead of being fetched.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(f"no headless Chromium found (looked for {', '.join(BROWSERS)}); "
                     "apt-get install -y chromium-headless-shell")


def screenshot(page: Path, out: Path, *, width: int = 1280, height: int = 6000,
               timeout: float = 120.0) -> Path:
    """Render ``page`` at ``width`` x ``height`` CSS pixels into the PNG ``out``."""
    page = page.resolve()
    if not page.exists():
        raise SystemExit(f"{page} does not exist; pass a report.html written by canal stream "
                         "or canal evaluate")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu",
               "--hide-scrollbars", f"--user-data-dir={profile}",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--window-size={width},{height}", f"--screenshot={out.resolve()}",
               page.as_uri()]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0 or not out.exists():
        raise SystemExit(f"chromium failed ({run.returncode}): {run.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path, help="report.html")
    p.add_argument("--out", type=Path, default=None, help="PNG (default: next to the page)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=6000, help="viewport height (the page is "
                   "cut off below it)")
    args = p.parse_args(argv)
    out = args.out or args.page.with_suffix(".png")
    screenshot(args.page, out, width=args.width, height=args.height)
    print(f"screenshot of {args.page} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
