"""Screenshots of the kernel-selection page for the README and the results pages.

Command (from the repository root; needs the dev install's chromium, chromium-driver and
selenium):

    python scripts/page_screenshots.py [--out experiments/results/pages]

Writes the pages of the shipped VGG-small's conv1 and conv5 (`jaxprune inspect`, objective
scores on 256 validation images, p = 5%), selects p of each layer with "select the N lowest",
and saves a screenshot of each page's top as PNG: conv1.png and conv5.png.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS = ("conv1", "conv5")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/results/pages")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for layer in LAYERS:
            subprocess.run(
                [sys.executable, "-m", "jaxprune.cli", "inspect", "--layer", layer,
                 "--out", folder, "--no-progress"],
                check=True,
            )  # fmt: skip
        chrome = browser()
        try:
            for layer in LAYERS:
                page = next(Path(folder).glob(f"*{layer}*.html"))
                chrome.get(page.as_uri())
                chrome.find_element("id", "select-lowest").click()
                chrome.save_screenshot(str(out / f"{layer}.png"))
                print(f"wrote {out / f'{layer}.png'}")
        finally:
            chrome.quit()


if __name__ == "__main__":
    main()
