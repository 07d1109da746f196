"""The HTML report as a person sees it: rendered by a real headless Chromium (Debian's
package). The page's paragraph and verdict text are in the rendered DOM, every figure
loads (each <img> marks itself on load), the JSON is a link, and a screenshot is drawn."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, env
from test_diag_rules import write_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (apt-get install -y chromium; "
                                       "the CI step before `make test`)")


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", "--virtual-time-budget=10000",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_report_renders_in_a_real_browser(tmp_path):
    run = tmp_path / "run"
    # Rank 1 becomes 25% slower at step 30; rank 0 is always a little late (no verdict for it).
    write_run(run, compute=lambda r, s: 0.16 * (1 + (0.09 if r == 0 else 0) + (0.25 if r == 1 and s >= 30 else 0)))
    p = subprocess.run([sys.executable, "-m", "diagnostics", "report", str(run)], env=env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    page = run / "diagnostics" / "report.html"

    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<p class=\"what\">Rank 1 on node 0 (h) has slowed the job down since" in html
    assert "<h3 class=\"verdict\">straggler: rank 1 on node 0 (h)</h3>" in html
    # timeline + the verdict's evidence, each loaded (a broken one replaces itself with a note)
    assert html.count("<img ") == 2 and html.count('data-loaded="1"') == 2
    assert '<a href="report.json">report.json</a>' in html and '"evidence"' not in html

    shot = tmp_path / "shot.png"
    s = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert s.returncode == 0 and shot.exists(), s.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200) and pixels.std() > 0.05  # drawn, not a blank page
