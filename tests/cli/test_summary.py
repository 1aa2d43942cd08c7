"""``--report x.html | x.png``: one page with quality along the plan's curve, the heatmap and the
per-class decisions; the HTML opens in a headless browser where one is installed."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from lfpass.cli import main
from lfpass.core.plan import FusionPlan
from lfpass.report import decisions, write_summary
from tests.onnx.test_real_files import converter_cnn

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "firefox")


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary")
    src, calib = root / "cnn.onnx", root / "c.npz"
    converter_cnn(src)
    np.savez(calib, image=np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))
    return src, calib, root


def test_report_writes_a_one_page_summary_as_png_and_html(budgeted, capsys):
    src, calib, root = budgeted
    for suffix in (".png", ".html"):
        out = root / f"summary{suffix}"
        rc = main(["optimize", str(src), "--inputs", str(calib), "--max-error", "0.05", "-o", str(root / "o.onnx"),
                   "--report", str(out)])
        assert rc in (0, 1), capsys.readouterr().err
    png = (root / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    page = (root / "summary.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "quality along the curve" in page and page.count("<tr>") >= 2  # a row per class
    assert not list(root.glob(".*"))  # written atomically: no temporary file left


def test_decisions_say_per_class_what_the_plan_does(budgeted):
    src, calib, root = budgeted
    import lfpass
    from lfpass.core.config import FusionConfig

    config = FusionConfig(target_ratio=None, max_error=0.05, actions="tie", merge="mean")
    plan = lfpass.optimize(src, root / "t.onnx", config, inputs=calib).plan
    rows = decisions(plan)
    assert rows and all(n >= 1 for _, n, _ in rows)
    tied = sum(len(g.members) for g in plan.groups)
    said = sum(int(what.split(" layers tied")[0].split()[-1]) for _, _, what in rows if "tied" in what)
    assert said == tied  # every tied layer counted once, in its class
    with pytest.raises(ValueError, match=".html or .png"):
        write_summary(plan, root / "x.pdf")


def test_the_html_summary_renders_in_a_headless_browser(budgeted, capsys):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless browser installed (apt install chromium): the page is checked as HTML above")
    src, calib, root = budgeted
    page = root / "summary.html"
    if not page.exists():
        main(["optimize", str(src), "--inputs", str(calib), "--max-error", "0.05", "-o", str(root / "o.onnx"),
              "--report", str(page)])
        capsys.readouterr()
    shot = root / "shot.png"
    args = ([browser, "--headless", "--screenshot", str(shot), page.as_uri()] if "firefox" in browser else
            [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", page.as_uri()])
    subprocess.run(args, capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 5_000
