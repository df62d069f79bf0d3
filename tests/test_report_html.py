"""The audit's ``report.html`` opened in a real browser (headless Chromium): every image and plot loads, and the
page logs nothing to the console."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from erasekit import audit as A
from erasekit.judges import FunctionJudge

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# a page beside report.html that opens it in a frame and lists its images with whether each one loaded
CHECK_PAGE = """<!doctype html><html><body><iframe id="report" src="report.html"></iframe><script>
document.getElementById("report").onload = function () {
  const images = Array.from(this.contentDocument.images);
  const out = document.createElement("pre");
  out.id = "result";
  out.textContent = JSON.stringify(images.map(i => [i.getAttribute("src"), i.complete && i.naturalWidth > 0]));
  document.body.appendChild(out);
};
</script></body></html>
"""


def open_in_chromium(page):
    """(DOM after loading ``page``, browser log) from headless Chromium."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=180)
    return done.stdout, done.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); .ci/run "
                                             "installs it")
def test_report_html_loads_every_image_and_logs_nothing(tmp_path):
    from erasekit.testing import tiny_pipeline

    judge = FunctionJudge(lambda ims: [np.asarray(im).mean() / 255 for im in ims], concept="cat", name="brightness",
                          version="1", threshold=0.466)
    A.audit(tiny_pipeline("sd1"), "cat", ["paraphrase"], ["a red cat", "a cat on a dog"], [0], judge,
            tmp_path / "audit", attack_configs={"paraphrase": {"synonyms": ("dog",)}}, paraphrases=["a red dog"],
            num_inference_steps=1, progress=False)
    page = tmp_path / "audit" / "check.html"
    page.write_text(CHECK_PAGE)
    dom, log = open_in_chromium(page)
    found = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert found, f"the report did not load in chromium:\n{dom[-2000:]}\n{log[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    sources = [src for src, _ in images]
    assert {"asr.png", "erasure.png", "grid.png"} <= set(sources)  # both plots and the image grid
    assert [src for src, loaded in images if not loaded] == []  # no broken image
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert console == []
