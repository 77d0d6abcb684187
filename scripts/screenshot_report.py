#!/usr/bin/env python
"""Screenshot an HTML report with headless Chromium: ``python scripts/screenshot_report.py PATH.html OUT.png``.

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); set ``CHROMIUM`` to use another.
The page is self-contained, so no network is needed; background networking is switched off anyway.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found (apt-get install -y chromium, or set CHROMIUM=/path/to/chrome)")


def screenshot(html: Path, out: Path, width: int = 1280, height: int = 2400, timeout: float = 120.0) -> Path:
    html, out = Path(html).resolve(), Path(out).resolve()
    if not html.is_file():
        raise SystemExit(f"no such file: {html}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
            f"--window-size={width},{height}", html.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file():
        raise SystemExit(f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args(argv)
    print(screenshot(args.html, args.out, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
