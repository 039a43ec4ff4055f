"""The HTML run report in a real headless browser: Debian's Chromium driven by Playwright.

A synthetic run directory (no training) → write_report → Chromium renders it: no console or page errors,
a screenshot that is not blank, every chart present with its points, and a sample's injected script
shown as text and never run. Chromium comes from apt and Playwright from PyPI (scripts/setup.sh);
Playwright's own browser download is not used.
"""

import io
import json
from pathlib import Path

import pytest

from rlhf_ray.report import write_report

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
INJECTED = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
STEPS = 8
EVAL_STEPS = (4, 8)


def _run_dir(root: Path) -> Path:
    rows = []
    for step in range(1, STEPS + 1):
        row = {"step": step, "reward/score_mean": 0.1 * step, "reward/vowel_mean": 0.05 * step,
               "kl/ref": 0.02 * step ** 1.5, "kl/coef": 0.05, "response/length_mean": 20.0 - step,
               "policy/loss": 1.0 / step, "time/step": 0.5, "reward/score_std": "nan"}
        if step in EVAL_STEPS:
            row |= {"eval/reward_mean": 0.08 * step, "eval/win_rate": 0.5 + 0.04 * step}
        rows.append(row)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "config.yaml").write_text("stage: ppo\ntrainer:\n  name: browser_check\n  total_steps: 8\n")
    return root


# chart (data-chart) → {series: points}
EXPECTED = {
    "reward": {"reward/score_mean": STEPS, "reward/vowel_mean": STEPS},
    "kl": {"kl/ref": STEPS, "kl/coef": STEPS},
    "response-length": {"response/length_mean": STEPS},
    "losses": {"policy/loss": STEPS},
    "evaluation-win-rate-and-pass-k": {"eval/win_rate": len(EVAL_STEPS)},
    "evaluation": {"eval/reward_mean": len(EVAL_STEPS)},
    "accuracy-by-subset": {},
}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup.sh` (it installs Debian's chromium package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run `bash scripts/setup.sh` (the test extra brings it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def rendered(browser, tmp_path_factory):
    """The report opened in Chromium: (page, console errors, page errors, screenshot PNG)."""
    run_dir = _run_dir(tmp_path_factory.mktemp("run"))
    samples = [{"prompt": "Say hi.", "response": INJECTED, "score": 0.5, "baseline_response": "hi",
                "baseline_score": 0.1},
               {"prompt": "x" * 2000, "response": "long prompt, wrapped", "score": 0.0}]
    path = write_report(run_dir, samples=samples, bars={"accuracy by subset": {"chat": 0.9, "safety": 0.7}})
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    console_errors, page_errors = [], []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    page.goto(path.as_uri(), wait_until="load")
    png = page.screenshot(full_page=True)
    yield page, console_errors, page_errors, png
    page.close()


def test_page_loads_without_errors(rendered):
    page, console_errors, page_errors, _ = rendered
    assert console_errors == [] and page_errors == []
    assert page.title() == "rlhf_ray run: browser_check"


def test_screenshot_is_not_blank(rendered):
    from PIL import Image

    *_, png = rendered
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, f"{len(colours)} distinct colours: the page looks blank"
    assert image.height > 900  # full page: charts, tables and config below the first screen


def test_every_chart_is_drawn_with_its_points(rendered):
    page, *_ = rendered
    charts = page.locator("svg.chart")
    assert sorted(charts.evaluate_all("svgs => svgs.map(s => s.dataset.chart)")) == sorted(EXPECTED)
    for chart, series in EXPECTED.items():
        svg = page.locator(f'svg[data-chart="{chart}"]')
        assert svg.is_visible() and svg.bounding_box()["width"] > 300
        for name, points in series.items():
            group = svg.locator(f'g.series[data-name="{name}"]')
            assert group.locator("circle.point").count() == points, (chart, name)
            polyline = group.locator("polyline").get_attribute("points")
            assert len(polyline.split()) == points, (chart, name)
    assert page.locator('svg[data-chart="accuracy-by-subset"] rect.bar').count() == 2
    assert page.locator("svg.chart g.series").count() == sum(len(s) for s in EXPECTED.values())


def test_injected_script_is_text_and_never_runs(rendered):
    page, *_ = rendered
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("script").count() == 0 and page.locator("table.samples img").count() == 0
    cell = page.locator("table.samples tbody tr").first.locator("td").nth(2)
    assert cell.inner_text() == INJECTED and cell.is_visible()


def test_long_text_wraps_inside_the_page(rendered):
    page, *_ = rendered
    table = page.locator("table.samples").bounding_box()
    assert table["x"] + table["width"] <= page.viewport_size["width"]
