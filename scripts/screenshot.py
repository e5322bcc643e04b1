#!/usr/bin/env python3
"""Screenshot an HTML file with headless Chromium: ``python scripts/screenshot.py REPORT.html OUT.png``.

Used to look at ``diffmis report`` pages without a desktop. Chromium (Debian package ``chromium``) must be on
PATH; the page is rendered 1280 px wide and 2400 px tall by default.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> Optional[str]:
    """Path of the first Chromium-like browser on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 2400, timeout: float = 120.0) -> Path:
    """Render ``html`` in headless Chromium and save a ``width`` x ``height`` PNG to ``png``.

    Raises:
        FileNotFoundError: ``html`` does not exist or no browser is on PATH.
        RuntimeError: the browser failed or wrote no PNG.
    """
    if not html.is_file():
        raise FileNotFoundError(f"no such HTML file: {html}")
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium on PATH (tried {', '.join(BROWSERS)}); apt-get install -y chromium")
    png = png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    # A throw-away profile: no state shared with other runs, nothing left in the home folder.
    with tempfile.TemporaryDirectory(prefix="diffmis-chromium-") as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            # offline machines: no background connections (update checks, sync, QUIC probes) to wait on
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
            f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"{browser} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return png


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the HTML file")
    parser.add_argument("png", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    try:
        out = screenshot(args.html, args.png, args.width, args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"screenshot: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
