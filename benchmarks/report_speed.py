"""Size and time to interactive of `vaekit report` pages in headless Chromium.

For each run given, the script writes its report, opens it from disk in Debian's Chromium (driven by Playwright) a few
times, and prints the file size, the seconds `vaekit report` took, and the time from navigation start to the end of
the page's set-up (when the map answers the mouse: window.vaekitReport.ready, performance.now() in the page).

    python benchmarks/report_speed.py RUN [RUN ...] [--loads 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

import vaekit


def main() -> None:
    """Write, load and time each run's report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--loads", type=int, default=5, help="page loads per report")
    a = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for run in a.runs:
            start = time.perf_counter()
            page_file = vaekit.report(run, Path(tmp) / f"{Path(run).name}.html")
            written = time.perf_counter() - start
            ready = []
            for _ in range(a.loads):
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(page_file.resolve().as_uri())
                page.wait_for_function("window.vaekitReport && window.vaekitReport.ready !== null")
                ready.append(page.evaluate("window.vaekitReport.ready") / 1000)
                page.close()
            size = page_file.stat().st_size / 2**20
            spread = f"median of {a.loads} loads; {min(ready):.3f} to {max(ready):.3f}"
            interactive = statistics.median(ready)
            print(
                f"{run}: {size:.2f} MiB, written in {written:.2f} s, interactive after {interactive:.3f} s ({spread})"
            )
        browser.close()


if __name__ == "__main__":
    main()
