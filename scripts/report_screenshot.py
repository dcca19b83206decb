"""Screenshot a run's HTML report with headless Chromium, to look at it as a reader would.

    python scripts/report_screenshot.py RUN [--out report.png] [--width 1100] [--height 9000] [--tiles 1600]

Renders ``RUN/report/report.html`` (or an HTML file given directly) in a window ``--width`` wide
and ``--height`` tall, trims the white space below the page, and writes ``--out`` (default
``RUN/report/report.png``). ``--tiles H`` also writes ``out-1.png``, ``out-2.png``, ... of at most
H pixels each, small enough for an image viewer. Needs ``chromium`` (Debian:
``apt-get install -y chromium``); exits 2 with one line when it is missing or the page is absent.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rundir import layout

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """The path of a Chromium-family browser on PATH, or None."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def screenshot(
    page: Path, out: Path, width: int = 1100, height: int = 9000, browser: str | None = None
) -> Path:
    """Render ``page`` headless into ``out`` (PNG), the blank space below the content trimmed.

    Raises FileNotFoundError when no browser is found, RuntimeError when it wrote no image.
    """
    from PIL import Image, ImageChops

    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install -y chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out.resolve()}", page.resolve().as_uri()]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not out.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot: {done.stderr.strip()[-500:]}")
    image = Image.open(out).convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
    if box:
        image.crop((0, 0, image.width, min(image.height, box[3] + 20))).save(out)
    return out


def tiles(path: Path, height: int) -> list[Path]:
    """Cut ``path`` into ``path-1.png``, ``path-2.png``, ... of at most ``height`` pixels each."""
    from PIL import Image

    image = Image.open(path)
    out = []
    for i, top in enumerate(range(0, image.height, height), start=1):
        tile = path.with_name(f"{path.stem}-{i}.png")
        image.crop((0, top, image.width, min(image.height, top + height))).save(tile)
        out.append(tile)
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the screenshot (and tiles); 2 with one line when the page or the browser is missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory, or an HTML file")
    parser.add_argument("--out", type=Path, help="PNG to write (default RUN/report/report.png)")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=9000, help="window height: the most that is shown")
    parser.add_argument("--tiles", type=int, default=0, metavar="H", help="also cut into tiles of H pixels")
    args = parser.parse_args(argv)
    page = args.run if args.run.suffix == ".html" else layout.report_dir(args.run) / "report.html"
    if not page.is_file():
        print(f"error: {page} is missing; run the report stage first", file=sys.stderr)
        return 2
    out = args.out or page.with_suffix(".png")
    try:
        screenshot(page, out, args.width, args.height)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    for tile in tiles(out, args.tiles) if args.tiles else []:
        print(tile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
