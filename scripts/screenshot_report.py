#!/usr/bin/env python
"""Screenshot an HTML report with headless Chromium: ``python scripts/screenshot_report.py PATH.html OUT.png``.

``--measure`` prints the page's height (CSS px at ``--width``) as Chromium lays it out. ``--full`` captures a window tall enough for the whole page (``--max-height``), measures the page's
height (the last row that is not background) and saves it cut into ``--tile``-pixel tiles next to OUT
(``OUT-01.png``, ...), small enough to look at. ``--fragment fig-3`` opens ``PATH.html#fig-3`` (e.g.
to see a figure's click-to-enlarge view).

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


def screenshot(html: Path, out: Path, width: int = 1400, height: int = 3000, timeout: float = 180.0,
               fragment: str | None = None) -> Path:
    html, out = Path(html).resolve(), Path(out).resolve()
    if not html.is_file():
        raise SystemExit(f"no such file: {html}")
    out.parent.mkdir(parents=True, exist_ok=True)
    url = html.as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
            f"--window-size={width},{height}", url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file():
        raise SystemExit(f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def page_height(html: Path, width: int = 1400, timeout: float = 180.0) -> int:
    """The page's scroll height in CSS px at ``width``, as it opens (``<details>`` closed or open as
    written), measured by Chromium itself: a copy of the page with a one-line script that writes
    ``document.documentElement.scrollHeight`` into the DOM, read back with ``--dump-dom``."""
    import re

    html = Path(html).resolve()
    text = html.read_text(encoding="utf-8")
    probe = ("<script>window.addEventListener('load',()=>{const p=document.createElement('pre');"
             "p.id='circuits-page-height';p.textContent=String(document.documentElement.scrollHeight);"
             "document.body.appendChild(p);});</script>")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(text.replace("</body>", probe + "</body>", 1), encoding="utf-8")
        cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={Path(tmp) / 'profile'}", f"--window-size={width},900",
               "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="circuits-page-height">(\d+)</pre>', proc.stdout)
    if not m:
        raise SystemExit(f"chromium measured nothing (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(m.group(1))


def content_height(png: Path) -> int:
    """Rows down to the last one that differs from the background (the top-left pixel's colour)."""
    from PIL import Image, ImageChops

    im = Image.open(png).convert("RGB")
    bg = Image.new("RGB", im.size, im.getpixel((0, 0)))
    box = ImageChops.difference(im, bg).getbbox()
    return 0 if box is None else box[3]


def tiles(png: Path, height: int, tile: int) -> list[Path]:
    from PIL import Image

    im = Image.open(png)
    out = []
    for i, top in enumerate(range(0, height, tile), start=1):
        p = png.with_name(f"{png.stem}-{i:02d}.png")
        im.crop((0, top, im.width, min(height, top + tile))).save(p)
        out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--fragment", default=None, help="open PATH.html#FRAGMENT")
    ap.add_argument("--full", action="store_true", help="capture the whole page, print its height, cut it in tiles")
    ap.add_argument("--max-height", type=int, default=16000, help="window height for --full")
    ap.add_argument("--tile", type=int, default=3000)
    ap.add_argument("--measure", action="store_true", help="print the page's height at --width (no screenshot)")
    args = ap.parse_args(argv)
    if args.measure:
        print(f"page height: {page_height(args.html, args.width)} px at {args.width} px wide")
        return 0
    if not args.full:
        print(screenshot(args.html, args.out, args.width, args.height, fragment=args.fragment))
        return 0
    shot = screenshot(args.html, args.out, args.width, args.max_height, fragment=args.fragment)
    h = content_height(shot)
    clipped = " (at least: the page reaches --max-height)" if h >= args.max_height - 1 else ""
    print(f"page height: {h} px{clipped}")
    for p in tiles(shot, h, args.tile):
        print(p)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head`: the reader left
        sys.exit(0)
