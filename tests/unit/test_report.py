"""The HTML run report's pure parts: tick choice, chart coordinates, metric grouping, escaping, bars."""

import json
import re

from rlhf_ray.report import (
    chart_groups,
    main,
    meaning,
    metric_series,
    nice_ticks,
    render_report,
    svg_bar_chart,
    svg_line_chart,
    write_report,
)


def _run_dir(tmp_path, rows, config="stage: ppo\ntrainer:\n  name: demo\n"):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.yaml").write_text(config)
    return tmp_path


def _attrs(tag: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', tag))


# --- ticks and coordinates ----------------------------------------------------------------------


def test_nice_ticks_cover_the_data_with_round_steps():
    assert nice_ticks(0.027, 0.132) == [0.025, 0.05, 0.075, 0.1, 0.125, 0.15]
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(1, 3, count=6, min_step=1.0) == [1, 2, 3]  # steps: never half a step


def test_nice_ticks_of_one_value_make_a_band_around_it():
    ticks = nice_ticks(12.0, 12.0)
    assert ticks[0] < 12.0 < ticks[-1] and 12.0 in ticks


def test_line_chart_maps_points_into_the_plot_box():
    # 640×280 with margins left 60, right 20, top 20, bottom 44: x 0..10 → 60..620, y 0..10 → 236..20
    svg = svg_line_chart({"a": [(0, 0.0), (10, 10.0)], "b": [(5, 2.5)]}, width=640, height=280)
    assert 'points="60.0,236.0 620.0,20.0"' in svg
    circles = [_attrs(c) for c in re.findall(r"<circle[^>]*>", svg)]
    assert [(c["cx"], c["cy"]) for c in circles] == [("60.0", "236.0"), ("620.0", "20.0"), ("340.0", "182.0")]
    assert ">10</text>" in svg and ">2.5</text>" not in svg  # tick labels at 0, 2, ..., 10


def test_long_series_are_drawn_as_lines_without_markers():
    svg = svg_line_chart({"a": [(i, float(i)) for i in range(1, 502)]})
    assert "<circle" not in svg and svg.count(",") == 501


# --- grouping and missing metrics --------------------------------------------------------------


def test_metrics_go_to_the_first_matching_chart():
    groups = chart_groups(["reward/score_mean", "reward/vowel_mean", "reward/group_std_mean", "kl/ref",
                           "eval/kl_ref", "response/length_mean", "eval/length_mean", "policy/loss",
                           "policy/kl_loss", "eval/win_rate", "eval/pass@4", "eval/reward_mean", "eval/loss",
                           "rm/accuracy", "time/step"])
    assert groups == {"Reward": ["reward/score_mean", "reward/vowel_mean"], "KL": ["kl/ref", "eval/kl_ref"],
                      "Response length": ["response/length_mean", "eval/length_mean"],
                      "Losses": ["policy/loss", "policy/kl_loss"], "Accuracy": ["rm/accuracy"],
                      "Evaluation: win-rate and pass@k": ["eval/win_rate", "eval/pass@4"],
                      "Evaluation": ["eval/reward_mean", "eval/loss"]}


def test_missing_and_non_finite_metrics_give_no_chart(tmp_path):
    rows = [{"step": 1, "time/step": 0.1, "reward/score_mean": "nan"}, {"step": 2, "time/step": 0.2}]
    assert metric_series(rows) == {"time/step": [(1, 0.1), (2, 0.2)]}
    page = render_report(_run_dir(tmp_path, rows))
    assert "<svg" not in page and "no charts" in page


def test_sparse_eval_metrics_plot_only_their_steps(tmp_path):
    rows = [{"step": s, "reward/score_mean": 0.1 * s} for s in range(1, 5)]
    rows[1]["eval/win_rate"], rows[3]["eval/win_rate"] = 0.4, 0.6
    page = render_report(_run_dir(tmp_path, rows))
    charts = {m.group(1): m.group(0) for m in re.finditer(r'data-chart="([^"]+)".*?</svg>', page, flags=re.DOTALL)}
    assert set(charts) == {"reward", "evaluation-win-rate-and-pass-k"}
    assert charts["reward"].count("<circle") == 4 and charts["evaluation-win-rate-and-pass-k"].count("<circle") == 2


def test_final_values_are_the_last_numbers_with_their_meaning(tmp_path):
    rows = [{"step": 1, "reward/vowel_mean": 0.5}, {"step": 2, "reward/vowel_mean": 0.75},
            {"step": 3, "reward/vowel_mean": "inf"}]
    page = render_report(_run_dir(tmp_path, rows))
    assert "<td>reward/vowel_mean</td><td>2</td><td>0.75</td><td>mean score of one reward source</td>" in page
    assert meaning("eval/pass@8").startswith("unbiased pass@k") and meaning("no/such") == ""


# --- escaping ----------------------------------------------------------------------------------


def test_user_text_is_escaped_everywhere(tmp_path):
    evil = '<script>window.__pwned = 1</script><img src=x onerror="alert(1)">'
    rows = [{"step": 1, "reward/<b>x</b>_mean": 1.0}]
    run_dir = _run_dir(tmp_path, rows, config=f"stage: ppo\ntrainer:\n  name: '{evil}'\nnote: '</pre>{evil}'\n")
    samples = [{"prompt": evil, "response": evil, "score": 1.0, "baseline_response": evil, "judge": {"why": evil}}]
    page = render_report(run_dir, samples=samples, title=evil, bars={evil: {evil: 0.5}})
    assert "<script" not in page.lower() and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert page.count('<table class="samples">') == 1 and "<th>baseline response</th>" in page


# --- bars, writing, CLI ------------------------------------------------------------------------


def test_bar_lengths_are_proportional_from_zero():
    # 640 wide: bars from x=170 (after the labels) to 584 (before the value text); ticks 0..1
    rects = [_attrs(r) for r in re.findall(r"<rect[^>]*>", svg_bar_chart({"chat": 0.5, "safety": 1.0}, width=640))]
    assert [(r["x"], r["width"]) for r in rects] == [("170.0", "207.0"), ("170.0", "414.0")]


def test_negative_bars_extend_left_of_zero():
    rects = [_attrs(r) for r in re.findall(r"<rect[^>]*>", svg_bar_chart({"a": -1.0, "b": 1.0}, width=640))]
    assert rects[0]["width"] == rects[1]["width"] and float(rects[0]["x"]) < float(rects[1]["x"])


def test_write_report_and_cli(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, [{"step": 1, "kl/ref": 0.1}, {"step": 2, "kl/ref": 0.2}])
    bars = {"accuracy by subset": {"chat": 0.9}}
    path = write_report(run_dir, bars=bars)
    page = path.read_text()
    assert path == run_dir / "report.html" and 'data-chart="kl"' in page and 'data-chart="accuracy-by-subset"' in page
    assert "<td>stage</td><td>ppo</td>" in page and "<td>run</td><td>demo</td>" in page
    (run_dir / "samples.jsonl").write_text(json.dumps({"prompt": "p?", "response": "r!", "score": 0.25}) + "\n")
    main([str(run_dir), "--out", str(tmp_path / "r.html"), "--samples", str(run_dir / "samples.jsonl")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    assert "<td>r!</td><td>0.25</td>" in (tmp_path / "r.html").read_text()


def test_one_row_of_evaluation_metrics_is_a_table_with_meanings_not_a_chart(tmp_path):
    row = {"step": 0, "eval/ppo/lc_win_rate": 0.7, "eval/ppo/rule/format_reward": 1.0, "eval/rm/close/accuracy": 0.9,
           "eval/sft/rm_mean": -1.0}
    page = render_report(_run_dir(tmp_path, [row], config="stage: eval\n"))
    assert "<svg" not in page and "Metrics at one step only" in page  # no single-point line charts
    assert meaning("eval/ppo/lc_win_rate").startswith("length-controlled win-rate")
    assert meaning("eval/ppo/rule/format_reward").startswith("pass share of one eval.rules function")
    assert meaning("eval/rm/close/accuracy") == "accuracy on one subset of eval.preference_data"
    assert meaning("eval/sft/rm_mean") == "mean score of one reward source over its answers"
    assert meaning("eval/sft/length_mean").startswith("mean response length")  # not the <source>_mean template
    for text in ("length-controlled win-rate", "pass share of one eval.rules", "accuracy on one subset"):
        assert text in page
    with_bars = render_report(tmp_path, bars={"accuracy by subset": {"close": 0.9}})
    assert "no charts" not in with_bars and with_bars.count("<svg") == 1
