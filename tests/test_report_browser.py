"""The HTML report in a real headless browser (Chromium): it loads without console errors and every
image renders (naturalWidth > 0). Skipped, with the reason, where no browser is installed
(Debian/Ubuntu: ``apt-get install chromium``); pip's playwright cannot download browsers offline.

How, without a browser-driver package: a copy of the page gets a small script that records script
errors and each image's naturalWidth into the DOM after load; ``--dump-dom`` prints that DOM, and
``--enable-logging=stderr`` prints the console, which must hold no error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import build_study
from test_report_which import _tradeoff_study

from fewtune.report import write_report

pytestmark = pytest.mark.slow  # a headless browser in a subprocess: not in the fast tier

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e)), true);
window.addEventListener('load', () => {
  const widths = Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = 'images=' + widths.join(',') + ';errors=' + window.__errors.length;
  document.body.appendChild(out);
});
</script>"""


def _browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def test_report_renders_in_a_headless_browser(tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip(f"no headless browser found ({', '.join(BROWSERS)}); install chromium to run this check")
    paths = write_report(build_study(tmp_path / "study", _tradeoff_study(tmp_path), claims=()))
    page = paths.html.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</head>", PROBE + "</head>", 1))
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                        "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"images=([\d,]*);errors=(\d+)", r.stdout)
    assert m, r.stdout[-2000:]
    widths = [int(w) for w in m.group(1).split(",") if w]
    assert len(widths) == len(paths.figures) > 0
    assert all(w > 0 for w in widths), widths
    assert m.group(2) == "0"
    console_errors = [l for l in r.stderr.splitlines() if "CONSOLE" in l and ("Error" in l or "Uncaught" in l)]
    assert not console_errors, console_errors
