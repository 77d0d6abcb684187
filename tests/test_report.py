"""circuits/report/ and figures.py without pytest-in-pytest: collector, writing, compare, baseline, the views."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from circuits import report as rp
from circuits.claims.core import Claims
from circuits.report.figures import Figures, FigureNameError, render_png, training_curves_svg
from circuits.report import render_html


def rep(nodeid, when, outcome, props=(), duration=0.01, longrepr=None, **kw):
    return SimpleNamespace(nodeid=nodeid, when=when, outcome=outcome, duration=duration, user_properties=list(props),
                           longrepr=longrepr, **kw)


def claim_props(control=None, seed=None, **values):
    """user_properties entries as the claim fixture makes them."""
    sink = []
    c = Claims(sink.append, raise_on_failure=False, control=control, seed=seed)
    for name, (v, t) in values.items():
        c.at_least(name, v, t)
    return [("circuits_claim", r.to_dict()) for r in sink]


def meta(nodeid, group, control=None, seed=None):
    return ("circuits_test", {"module": "hyp/test_m.py", "group": group, "test": nodeid.split("::")[1],
                              "control": control, "seed": seed, "module_doc": "Hypothesis: x.", "circuits": True})


def sample_collector():
    col = rp.RunCollector()
    g = "hyp/test_m.py::test_acc"
    main, ctl = g + "[main]", g + "[control=untrained]"
    props_main = [meta(main, g), *claim_props(acc=(0.97, 0.9), r=(0.62, 0.9))]
    col.add_test_report(rep(main, "setup", "passed", props_main[:1]))
    col.add_test_report(rep(main, "call", "failed", props_main, longrepr="E   AssertionError: r = 0.62 ..."))
    col.add_test_report(rep(main, "teardown", "passed", props_main))  # the same records again: kept once
    props_ctl = [meta(ctl, g, control="untrained"), *claim_props(control="untrained", acc=(0.5, 0.9), r=(0.95, 0.9)),
                 ("circuits_control", {"control": "untrained", "outcome": "no_teeth", "message": "no teeth: r"})]
    col.add_test_report(rep(ctl, "call", "failed", props_ctl))
    col.add_test_report(rep("hyp/test_m.py::test_setup_err", "setup", "failed", [], longrepr="E   OSError: disk"))
    col.add_test_report(rep("hyp/test_m.py::test_refuted", "call", "skipped",
                            [*claim_props(copy=(0.2, 0.8))], wasxfail="refuted: no copying"))
    col.add_test_report(rep("hyp/test_m.py::test_td", "call", "passed"))
    col.add_test_report(rep("hyp/test_m.py::test_td", "teardown", "failed", longrepr="E   RuntimeError: td"))
    return col


def test_collector_outcomes_dedupe_and_controls():
    report = sample_collector().build(run_id="r1")
    outcomes = {t["nodeid"].split("::")[1]: t["outcome"] for t in report["tests"]}
    assert outcomes == {"test_acc[main]": "failed", "test_acc[control=untrained]": "failed",
                        "test_setup_err": "error", "test_refuted": "xfailed", "test_td": "error"}
    main = [c for c in report["claims"] if not c.get("control")]
    assert [c["name"] for c in main] == ["acc", "r", "copy"]  # each once, in order
    acc, r, copy = main
    assert acc["status"] == "PASS" and r["status"] == "FAIL" and copy["status"] == "XFAIL"
    assert [(x["control"], x["outcome"]) for x in acc["controls"]] == [("untrained", "failed")]
    assert [(x["control"], x["outcome"]) for x in r["controls"]] == [("untrained", "held")]
    assert report["summary"]["claims"] == 3 and report["summary"]["controls_no_teeth"] == 1
    assert [t["nodeid"] for t in rp.problem_tests(report)] == ["hyp/test_m.py::test_setup_err",
                                                              "hyp/test_m.py::test_td"]
    assert report["modules"]["hyp/test_m.py"]["doc"] == "Hypothesis: x."
    json.dumps(report, allow_nan=False)


def test_pass_rates_over_seeds():
    claims = [{"group": "m::t", "name": "acc", "seed": s, "passed": ok, "module": "m"} for s, ok in
              [(0, True), (1, False), (2, True)]]
    claims.append({"group": "m::t", "name": "acc", "seed": 0, "passed": False, "control": "untrained"})
    (row,) = rp.pass_rates(claims)
    assert row["n"] == 3 and row["passed"] == 2 and row["rate"] == pytest.approx(2 / 3)
    assert row["seeds"] == {"0": True, "1": False, "2": True}


def _claim(name, passed, margin, value, group="m::t", control=None):
    return {"group": group, "name": name, "passed": passed, "margin": margin, "value_text": value,
            "control": control, "seed": None, "module": "m"}


def test_compare_reports_flips_moves_added_removed():
    before = {"run_id": "old", "claims": [_claim("a", True, 0.1, "0.9"), _claim("b", True, 0.2, "0.8"),
                                          _claim("gone", True, 0.1, "1"), _claim("a", False, -0.4, "0.5", control="u")]}
    after = {"claims": [_claim("a", False, -0.05, "0.75"), _claim("b", True, 0.5, "0.5"),
                        _claim("new", True, 0.1, "1"), _claim("a", True, 0.1, "0.99", control="u")]}
    cmp_ = rp.compare_reports(after, before)
    assert cmp_["against"]["run_id"] == "old"
    assert [(r["name"], r["control"], r["before"], r["after"]) for r in cmp_["flipped"]] == [
        ("a", None, True, False), ("a", "u", False, True)]
    # (a Comparison record since schema 2: its counts compare as their JSON)
    assert cmp_.counts.to_json() == {"matched": 3, "flipped": 2, "to_fail": 1, "to_pass": 1, "moved": 1, "not_run": 0}
    assert [r["name"] for r in cmp_["moved"]][0] == "a" and cmp_["moved"][0]["delta"] == pytest.approx(0.5)
    assert [c["name"] for c in cmp_["added"]] == ["new"] and [c["name"] for c in cmp_["removed"]] == ["gone"]
    md = rp.render_markdown({"run_id": "x", "claims": [], "compare": cmp_})
    assert "⇄ flipped" in md and "1 gone" in md


def test_write_run_is_strict_json_and_self_contained_html(tmp_path):
    from matplotlib.figure import Figure

    col = sample_collector()
    run_dir = tmp_path / "reports" / "r1"
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    (run_dir / "figures").mkdir(parents=True)
    (run_dir / "figures" / "f.png").write_bytes(render_png(fig))
    col.add_properties("hyp/test_m.py::test_acc[main]", [
        ("circuits_figure", {"name": "attn", "caption": "pattern <b>", "path": "figures/f.png"}),
        ("circuits_model", {"name": "toy", "seed": 0, "source": "trained", "wall_time": 1.0,
                            "metrics": {"acc": 0.9, "history": [{"step": i, "loss": 1 / (i + 1), "acc": i / 9}
                                                                for i in range(10)]}}),
        ("circuits_claim", {"name": "weird", "value": float("nan"), "passed": False}),  # NaN must not leak
    ])
    report = col.build(run_id="r1", created="2025-01-01T00:00:00", duration_s=1.0, machine=rp.machine_info(),
                       git=rp.git_info(tmp_path))
    paths = rp.write_run(report, run_dir)
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert data["run_id"] == "r1" and data["git"]["commit"] is None
    assert (tmp_path / "reports" / "latest.txt").read_text().strip() == "r1"
    assert (tmp_path / "reports" / "latest").is_symlink() and (tmp_path / "reports" / "latest" / "report.json").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left behind
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 1 and html.count("<svg") == 1  # the figure + the training curve
    assert "pattern &lt;b&gt;" in html and "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html
    md = paths["md"].read_text()
    assert "| test | claim | measured | op | threshold | margin | result | controls (value, margin) |" in md
    assert "| r ⚠ generic controls only |" in md and "❌ **FAIL**" in md
    assert "untrained ✗ held 0.95 (needs &gt;= 0.90, margin +0.05)" in md


def test_resolve_load_baseline_and_cli(tmp_path, capsys):
    reports = tmp_path / "reports"
    rp.write_json_atomic(reports / "r1" / "report.json", {"run_id": "r1", "claims": []})
    (reports / "latest").write_text("r1\n")
    assert rp.resolve_report("r1", reports) == reports / "r1" / "report.json"
    assert rp.resolve_report("latest", reports) == reports / "r1" / "report.json"
    assert rp.resolve_report(str(reports / "r1"), reports) == reports / "r1" / "report.json"
    with pytest.raises(rp.ReportNotFoundError, match="no report for 'nope'.*runs in .*: r1"):
        rp.resolve_report("nope", reports)
    (reports / "bad").mkdir()
    (reports / "bad" / "report.json").write_text("{not json")
    with pytest.raises(rp.ReportError, match="cannot read report"):
        rp.load_report("bad", reports)
    dest = rp.set_baseline(reports / "r1")
    assert dest == reports / "baseline" / "report.json"
    assert json.loads(dest.read_text())["baseline_of"] == "r1"
    assert rp.load_report("baseline", reports)["run_id"] == "r1"
    from circuits.cli import main as cli

    (reports / "baseline" / "report.json").unlink()
    assert cli(["report", "r1", "--promote-baseline", "--report-dir", str(reports)]) == 0
    assert json.loads(dest.read_text())["baseline_of"] == "r1"
    assert cli(["report", "zzz", "--promote-baseline", "--report-dir", str(reports)]) == 2
    assert "no report for 'zzz'" in capsys.readouterr().err


def test_terminal_lines_and_margins():
    report = sample_collector().build(run_id="r1")
    lines = [text for text, _ in rp.terminal_lines(report)]
    assert lines[0].split() == ["test", "claim", "measured", "op", "threshold", "margin", "result"]
    assert any("↳ control untrained" in ln and "NO TEETH" in ln for ln in lines)
    assert any(ln.startswith("test_acc") and ln.rstrip().endswith("FAIL (generic controls only)") and "−0.28" in ln
               for ln in lines)
    assert rp.fmt_margin(0.05) == "+0.05" and rp.fmt_margin(None) == "—"


def test_figures_object_and_training_curves():
    from matplotlib.figure import Figure

    got = []
    figs = Figures(lambda name, png, cap: got.append((name, png[:8], cap)))
    fig = Figure()
    fig.add_subplot().plot([1, 2])
    figs.add("a", fig, caption="c")
    assert got == [("a", b"\x89PNG\r\n\x1a\n", "c")]
    with pytest.raises(FigureNameError, match="used twice"):
        figs.add("a", Figure())
    with pytest.raises(TypeError, match=r"needs a matplotlib.figure.Figure, got numpy.ndarray"):
        import numpy as np

        figs.add("b", np.zeros((2, 2)))
    with pytest.raises(TypeError, match=r"got matplotlib.axes._axes.Axes \(pass its .figure\)"):
        figs.add("c", Figure().add_subplot())
    built = []

    def make():
        built.append(1)
        f = Figure()
        f.add_subplot().plot([3, 4])
        return f

    figs.add("lazy", make)
    assert built == [1] and got[-1][0] == "lazy"  # a callable is built when rendered
    quiet = Figures(lambda name, png, cap: got.append(name), render=False)
    quiet.add("skipped", make)
    quiet.add("skipped too", Figure())
    assert built == [1] and got[-1][0] == "lazy"  # not rendered: nothing built, nothing attached
    with pytest.raises(FigureNameError, match="used twice"):
        quiet.add("skipped", Figure())
    with pytest.raises(TypeError, match="needs a matplotlib.figure.Figure"):
        quiet.add("bad", [1, 2])


def test_training_curves_svg():
    import xml.etree.ElementTree as ET

    assert training_curves_svg({"name": "m"}) is None
    assert training_curves_svg({"name": "m", "metrics": {"history": [{"step": 0, "loss": float("nan")}]}}) is None
    svg = training_curves_svg({"name": "m<&>", "seed": 3, "metrics": {"history": [
        {"step": 0, "loss": 1.0}, {"step": 100, "loss": 0.5}, {"step": 200, "loss": float("inf")}]}})
    root = ET.fromstring(svg)  # well-formed XML: the title is escaped
    assert "m<&> (seed 3)" in "".join(root.itertext())
    (line,) = root.iter("polyline")
    assert len(line.get("points").split()) == 2  # the non-finite point is left out
    ys = [float(p.split(",")[1]) for p in line.get("points").split()]
    assert ys[0] < ys[1]  # SVG y grows downwards: the higher loss is drawn higher
    # the trainer's held-out metrics (eval_*) are drawn too, accuracy dashed on its own axis
    held_out = [{"step": 0, "eval_acc": 0.5, "eval_loss": 0.7}, {"step": 1, "eval_acc": 0.9, "eval_loss": 0.3}]
    root = ET.fromstring(training_curves_svg({"name": "m", "metrics": {"history": held_out}}))
    lines = list(root.iter("polyline"))
    assert [l.get("stroke-dasharray") is not None for l in lines] == [False, True]
    assert {"loss", "accuracy", "eval_loss", "eval_acc"} <= set(root.itertext())


def test_html_renders_a_minimal_report(tmp_path):
    html = render_html({"run_id": "x", "claims": [], "tests": []}, tmp_path)
    assert html.startswith("<!doctype html>") and "circuits run" in html


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_screenshot_script_renders_a_report(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    paths = rp.write_run(sample_collector().build(run_id="shot"), tmp_path / "reports" / "shot")
    out = tmp_path / "shot.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"
    subprocess.run([sys.executable, str(script), str(paths["html"]), str(out), "--height", "600"], check=True,
                   capture_output=True, timeout=120)
    assert out.read_bytes().startswith(b"\x89PNG")


# --- issue 14: escaping, noise floor, subsets, models table, one-line summary, page layout -------------------


def test_markdown_escapes_html_and_table_syntax_from_tests():
    col = rp.RunCollector()
    nodeid = "hyp/test_m.py::test_x"
    props = [meta(nodeid, nodeid), ("circuits_claim", {"name": "<script>alert(1)</script>", "op": "at_least",
                                                       "value": 1.0, "passed": True, "requirement": ">= 0.5",
                                                       "value_text": "1", "margin": 0.5, "detail": "a|b <img src=x>"}),
             ("circuits_claim", {"name": "x|y *bold* [l](u)", "op": "holds", "value": None, "passed": False,
                                 "requirement": "holds", "value_text": "False", "message": "no <b>"})]
    col.add_test_report(rep(nodeid, "call", "failed", props, longrepr="E   AssertionError: <b>x</b> | y"))
    md = rp.render_markdown(col.build(run_id="r`1"))
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "x\\|y \\*bold\\* \\[l\\](u)" in md  # the table keeps its columns, no emphasis or link
    for line in md.splitlines():
        if line.startswith("| test_x"):  # every claim row has exactly the header's 9 separators
            assert line.replace("\\|", "").count("|") == 9, line
    assert rp.md_escape("a\nb") == "a b"


def test_compare_noise_floor_and_subset_runs():
    before = {"run_id": "old", "claims": [_claim("noise", True, 0.1, "0.9"), _claim("real", True, 0.1, "0.9"),
                                          _claim("other", True, 0.1, "1", group="m::t2"),
                                          _claim("dropped", True, 0.1, "1")]}
    before["claims"][0]["value"] = before["claims"][1]["value"] = 0.9
    after = {"claims": [{**_claim("noise", True, 0.1 + 6e-10, "0.9"), "value": 0.9 + 6e-10},
                        {**_claim("real", True, 0.1 - 0.002, "0.898"), "value": 0.898}],
             "tests": [{"nodeid": "m::t", "group": "m::t", "control": None, "seed": None, "outcome": "passed"}]}
    cmp_ = rp.compare_reports(after, before)
    moved = {r["name"]: r["moved"] for r in cmp_["moved"]}
    assert moved == {"noise": False, "real": True}  # 6e-10 is float noise; 0.002 on 0.9 is not
    assert [r["name"] for r in rp.compare_display_rows(cmp_)] == ["real"]
    # m::t2 did not run in this run: "not run", never "gone"; m::t ran without "dropped": gone
    assert [c["name"] for c in cmp_["removed"]] == ["dropped"] and cmp_["counts"]["not_run"] == 1
    md = rp.render_markdown({"run_id": "x", "claims": [], "compare": cmp_})
    assert "1 gone, 1 not run in this run" in md and "\\|Δ\\| &gt; 1e-06 and &gt; 0.0001 × \\|value\\|" in md
    assert rp.ABS_TOL == 1e-6 and rp.REL_TOL == 1e-4


def test_models_table_puts_held_out_metrics_first():
    metrics = {"acc": 0.9, "elapsed": 3.0, "eval_loss": 0.3, "eval_acc": 0.91, "history": [], "loss": 0.2,
               "lr": 1e-3, "step": 10, "test_loss": 0.25, "test_acc": 0.899}
    assert [k for k, _ in rp.ordered_metrics(metrics)][:4] == ["test_acc", "test_loss", "eval_acc", "eval_loss"]
    html = render_html({"run_id": "x", "claims": [], "tests": [], "models": [
        {"name": "m", "seed": 0, "source": "reference", "metrics": metrics}]}, ".")
    assert "test_acc 0.899, test_loss 0.25, eval_acc 0.91, eval_loss 0.3" in html


def test_held_out_accuracy_carries_its_test_sets_interval_in_html_and_markdown():
    """Issue 17: a test accuracy is shown with its Wilson 95% interval over the test set's size."""
    from circuits.report.views import held_out

    h = held_out({"test_acc": 0.999}, 100_000)
    assert h["lo"] < 0.999 < h["hi"] and h["hi"] - h["lo"] == pytest.approx(0.000392, abs=2e-5)
    assert held_out({"test_acc": 0.999}, 0) is None and held_out({"eval_acc": 0.9}, 1000) is None
    models = [{"name": "m", "seed": 3, "source": "cache", "n_test": 100_000, "metrics": {"test_acc": 0.999, "eval_acc": 0.95}},
              {"name": "no_test", "seed": 0, "source": "reference", "n_test": 0, "metrics": {"eval_acc": 0.5}}]
    html = render_html({"run_id": "x", "claims": [], "tests": [], "models": models}, ".")
    assert "test_acc 99.900% [99.878%, 99.918%] (Wilson 95%, 100,000 held out); eval_acc 0.95" in html
    md = rp.render_markdown({"run_id": "x", "claims": [], "models": models})
    assert "| `m` | 3 | cache | 99.900% [99.878%, 99.918%] | 100,000 |" in md and "no_test" not in md


def test_one_line_summary_and_terminal_end():
    report = sample_collector().build(run_id="r1")
    line = rp.one_line_summary(report)
    # every kind counted apart: the failed claim (r), the no-teeth control run, two fixture errors
    assert line == ("circuits: 1 claims held, 1 known failures, 1 failed claims, 1 no-teeth, 0 no-power, 0 unspecific, 2 errors, "
                    "2 with generic controls only, 1 without controls")
    assert [(e["kind"], e["nodeid"].split("::")[1]) for e in report["errors"]] == [
        ("fixture", "test_setup_err"), ("fixture", "test_td")]
    lines = rp.terminal_lines({**report, "_html_path": "reports/r1/report.html"})
    assert lines[-1][0] == line + " — report: reports/r1/report.html"


def test_page_rollup_toc_and_figures_next_to_their_claims(tmp_path):
    from matplotlib.figure import Figure

    col = sample_collector()
    run_dir = tmp_path / "r1"
    (run_dir / "figures").mkdir(parents=True)
    fig = Figure(figsize=(5, 3))
    fig.add_subplot().plot([0, 1])
    (run_dir / "figures" / "f.png").write_bytes(render_png(fig))
    col.add_properties("hyp/test_m.py::test_acc[main]",
                       [("circuits_figure", {"name": "curve", "path": "figures/f.png"})])
    html = render_html(col.build(run_id="r1"), run_dir)
    assert '<a href="#m-hyp-test_m-py">' in html and 'id="m-hyp-test_m-py"' in html  # roll-up links to the module
    # the figure comes right after its own test's claims table, before the next test's heading
    i_claims, i_fig, i_next = html.index("<code>r</code>"), html.index('id="fig-1"'), html.index(">test_refuted<")
    assert i_claims < i_fig < i_next
    # click to enlarge: a :target lightbox on the figure itself (the PNG is embedded once), no script
    assert 'href="#fig-1"' in html and "figure.fig:target" in html and html.count("data:image/png") == 1
    assert 'style="width:68.0%"' in html  # a 500 px figure at 1.6x, in a 1176 px column
    assert "<script" not in html


def test_parametrized_cases_share_one_heading():
    col = rp.RunCollector()
    for k in (1, 2):
        nodeid = f"hyp/test_m.py::test_sweep[{k}]"
        props = [meta(nodeid, nodeid), *claim_props(**{f"k{k}": (1.0, 0.5)})]
        col.add_test_report(rep(nodeid, "call", "passed", props))
    (g,) = rp.views.test_groups(col.build(run_id="r"), "hyp/test_m.py")
    assert g["group"] == "hyp/test_m.py::test_sweep" and [c["name"] for c in g["claims"]] == ["k1", "k2"]


# --- issue 15 item 2: control values and the power matrix ----------------------------------------------------


def power_collector():
    """One test with a generic control, a hand-written control and a targeted mutation that the claim survives."""
    col = rp.RunCollector()
    g = "hyp/test_m.py::test_head"
    runs = [(None, dict(score=(0.8, 0.5), other=(0.9, 0.5))),
            ("untrained", dict(score=(0.1, 0.5), other=(0.2, 0.5))),
            ("mutate:zero:L0H1", dict(score=(0.7, 0.5), other=(0.3, 0.5)))]
    for spec, values in runs:
        nodeid = g + ("[main]" if spec is None else f"[control={spec}]")
        props = [meta(nodeid, g, control=spec), *claim_props(control=spec, **values)]
        if spec:
            outcome = "no_power" if spec.startswith("mutate:") else "ok"
            props.append(("circuits_control", {"control": spec, "kind": "mutation" if spec.startswith("mutate:")
                                               else "model", "outcome": outcome, "message": "m"}))
        col.add_test_report(rep(nodeid, "call", "passed", props))
    g2 = "hyp/test_m.py::test_generic"
    for spec, v in ((None, 0.9), ("untrained", 0.1), ("shuffle_labels", 0.2)):
        nodeid = g2 + ("[main]" if spec is None else f"[control={spec}]")
        col.add_test_report(rep(nodeid, "call", "passed", [meta(nodeid, g2, control=spec),
                                                           *claim_props(control=spec, acc=(v, 0.5))]))
    return col.build(run_id="p")


def test_controls_carry_value_requirement_margin_and_kind():
    report = power_collector()
    main = {c["name"]: c for c in report["claims"] if not c.get("control")}
    (untrained, mutation) = main["score"]["controls"]
    assert untrained == {**untrained, "control": "untrained", "kind": "control", "outcome": "failed", "value": 0.1,
                         "value_text": "0.1", "requirement": ">= 0.5"}
    assert untrained["margin"] == pytest.approx(-0.4)
    assert mutation["kind"] == "mutation" and mutation["outcome"] == "held" and mutation["margin"] == pytest.approx(0.2)
    assert not main["score"]["generic_only"] and main["acc"]["generic_only"]  # untrained + shuffle_labels only
    assert report["summary"]["generic_only"] == 1 and report["summary"]["controls_no_power"] == 1
    md = rp.render_markdown(report)
    assert "untrained ✓ 0.1 (needs &gt;= 0.5, margin −0.4)" in md and "generic controls only" in md
    lines = [t for t, _ in rp.terminal_lines(report)]
    assert any("↳ mutation zero:L0H1" in ln and ">=" in ln and "+0.2" in ln and "NO POWER" in ln
               for ln in lines)
    assert any("↳ control untrained" in ln and "0.5" in ln and "−0.4" in ln and "OK (failed)" in ln for ln in lines)


def test_power_matrix_cells():
    report = power_collector()
    pm = rp.power_matrix(report, "hyp/test_m.py")
    assert pm["columns"] == [("shuffle_labels", "control"), ("untrained", "control"), ("mutate:zero:L0H1", "mutation")]
    rows = {r["claim"]["name"]: r["cells"] for r in pm["rows"]}
    assert set(rows) == {"score", "other", "acc"}
    assert rp.views.cell_verdict(rows["score"]["mutate:zero:L0H1"]) == ("bad", "no power")
    assert rp.views.cell_verdict(rows["other"]["mutate:zero:L0H1"]) == ("ok", "fails ✓")
    assert rp.views.cell_verdict(rows["score"].get("shuffle_labels")) == ("na", "")
    html = render_html(report, ".")
    # one narrow column per control / mutation, a symbol per cell, value / requirement / margin in its tooltip
    assert '<th class="spec mutation" title="mutation mutate:zero:L0H1"><span>zero:L0H1</span></th>' in html
    assert re.search(r'<td class="cell bad" title="score on mutation zero:L0H1: no power — 0\.7 \(needs [^"]*'
                     r'margin \+0\.2\)">✗</td>', html), html[html.index('class="pm"'):][:3000]
    assert "Power matrix" in html and 'id="m-hyp-test_m-py--power"' in html  # an anchor on the heading
    assert "generic controls only" in html


# --- issue 17 item 1: the robustness view ----------------------------------------------------------------------


@pytest.mark.parametrize("k, n, lo, hi", [(0, 10, 0.0, 0.27753), (5, 10, 0.23659, 0.76341), (10, 10, 0.72247, 1.0),
                                          (1, 2, 0.09453, 0.90547), (2, 3, 0.20765, 0.93851), (0, 0, 0.0, 1.0)])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = rp.wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def seeds_report():
    col = rp.RunCollector()
    g = "hyp/test_m.py::test_acc"
    for seed, acc, bind in ((None, 0.95, None), (0, 0.85, "L0H0"), (1, 0.93, "L1H0")):
        nodeid = g + ("[main]" if seed is None else f"[seed={seed}]")
        props = [meta(nodeid, g, seed=seed), *claim_props(seed=seed, acc=(acc, 0.9))]
        if bind:
            props[-1][1]["extra"] = {"binding": {"mirror_head": bind}}
        col.add_test_report(rep(nodeid, "call", "passed" if acc >= 0.9 else "failed", props))
    g2 = "hyp/test_m.py::test_refuted"
    for seed in (0, 1):
        nodeid = f"{g2}[seed={seed}]"
        props = [meta(nodeid, g2, seed=seed), *claim_props(seed=seed, copy=(0.2, 0.8))]
        col.add_test_report(rep(nodeid, "call", "skipped", props, wasxfail="refuted"))
    return col.build(run_id="s")


def test_robustness_view_groups_by_claim_with_reference_flips_and_expected_failures(tmp_path):
    report = seeds_report()
    acc, copy = rp.robustness(report)
    assert acc["reference"]["passed"] and acc["reference"]["source"] == "this run"
    assert [(s["seed"], s["passed"], s["flip"], s["binding"]) for s in acc["seeds"]] == [
        (0, False, True, "mirror_head=L0H0"), (1, True, False, "mirror_head=L1H0")]
    assert (acc["passed"], acc["n"]) == (1, 2) and acc["lo"] == pytest.approx(0.0945, abs=1e-4)
    assert copy["expected_failure"] and copy["reference"] is None and copy["passed"] == 0
    md = rp.render_markdown(report)
    assert "seed 0: **fail** 0.85 (−0.05, mirror\\_head=L0H0) ⇄ flipped" in md
    assert "known failure: expected to fail" in md and "seed 1: expected fail 0.2" in md
    paths = rp.write_run(report, tmp_path / "s")
    html = paths["html"].read_text()
    assert "Robustness across seeds" in html and 'class="chip warn">seed 0: expected' in html
    lines = [t for t, _ in rp.terminal_lines(report)]
    assert any("test_acc acc: 1/2 (50%) Wilson 95% [9%, 91%]" in ln and "ref P 0.95; 0:F⇄ 1:P" in ln for ln in lines)
    # the view comes before any figure in all outputs: it precedes the module sections
    assert html.index('id="robustness"') < html.index('id="m-hyp-test_m-py"')
    assert md.index("Pass rate across seeds") < md.index("### `hyp/test_m.py`")


def test_robustness_reference_from_compare():
    report = seeds_report()
    report["claims"] = [c for c in report["claims"] if c.get("seed") is not None]
    ref = {"run_id": "base", "claims": [{"group": "hyp/test_m.py::test_acc", "name": "acc", "seed": None,
                                         "control": None, "passed": False, "value_text": "0.5", "margin": -0.4}]}
    report["compare"] = rp.compare_reports(report, ref)
    acc = rp.robustness(report)[0]
    assert acc["reference"]["source"] == "base" and [s["flip"] for s in acc["seeds"]] == [False, True]


def test_a_control_run_that_known_failures_documents_is_listed_apart_not_as_a_problem():
    """The main job's summary said "8 no-teeth" and printed them red although every one was a
    KNOWN_FAILURES entry with its reason; a documented run is counted and listed apart, an undocumented
    one stays a problem."""
    col = sample_collector()
    g = "hyp/test_m.py::test_bound"
    ctl = g + "[control=randomise]"
    props = [meta(ctl, g, control="randomise"), *claim_props(control="randomise", acc=(0.95, 0.9)),
             ("circuits_control", {"control": "randomise", "outcome": "no_teeth", "message": "no teeth: acc",
                                   "known": "the bound is below what the residual alone reaches"})]
    col.add_test_report(rep(ctl, "call", "skipped", props, wasxfail="known failure of this control run"))
    report = col.build(run_id="r1")
    s = report["summary"]
    assert (s["controls_no_teeth"], s["controls_known"]) == (1, 1)  # the sample's undocumented one stays
    assert rp.one_line_summary(report) == ("circuits: 1 claims held, 1 known failures, 1 failed claims, "
                                           "1 no-teeth (+1 known), 0 no-power, 0 unspecific, 2 errors, 2 with generic controls "
                                           "only, 1 without controls")
    md = rp.render_markdown(report)
    known_at, problems_at = md.index("### Claims known to hold under a control"), md.index("### Problems")
    assert problems_at < known_at  # what a reader must look at first
    assert "the bound is below what the residual alone reaches" in md[known_at:]
    assert ctl not in md[problems_at:known_at] and "test_acc[control=untrained]" in md[problems_at:known_at]
    html = render_html(report, ".")
    assert 'id="known-controls"' in html and html.index(ctl) > html.index('id="known-controls"')
    lines = rp.terminal_lines(report)
    red = [text for text, style in lines if style.get("red")]
    assert any("test_acc[control=untrained]" in t for t in red) and not any(ctl in t for t in red)
    assert any(ctl in text and "known" in text for text, _ in lines)


def test_cli_report_prints_plain_text_markdown_on_request_and_opens_a_browser(tmp_path, capsys, monkeypatch):
    from circuits.cli import main as cli

    reports = tmp_path / "reports"
    rp.write_run(sample_collector().build(run_id="r1"), reports / "r1")
    assert cli(["report", "--report-dir", str(reports)]) == 0  # latest: the symlink
    text = capsys.readouterr().out
    assert text.rstrip().splitlines()[-1].startswith("circuits: 1 claims held")
    assert "&gt;" not in text and "\\_" not in text and "|---|" not in text  # plain text, no Markdown
    assert str(reports / "r1" / "report.html") in text
    assert cli(["report", "r1", "--markdown", "--report-dir", str(reports)]) == 0
    assert "|---|" in capsys.readouterr().out
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    assert cli(["report", "r1", "--open", "--report-dir", str(reports)]) == 0
    assert opened == [(reports / "r1" / "report.html").resolve().as_uri()]
    assert "opened: " in capsys.readouterr().out


def test_every_cli_argument_has_help():
    import argparse

    from circuits import cli

    parsers = []
    real = argparse.ArgumentParser.parse_args
    try:  # build the parser without running a command: stop at parse_args
        def stop(self, *a, **k):
            parsers.append(self)
            raise SystemExit(0)
        argparse.ArgumentParser.parse_args = stop
        with pytest.raises(SystemExit):
            cli.main([])
    finally:
        argparse.ArgumentParser.parse_args = real
    (top,) = parsers
    subs = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    missing = [f"{name} {a.dest}" for name, sp in subs.items() for a in sp._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    helps = {c.dest: c.help for c in [a for a in top._actions if isinstance(a, argparse._SubParsersAction)][0]
             ._choices_actions}
    assert "reuse" in helps["train"] and "from scratch" not in helps["train"], helps["train"]


# --- issue 32: the page a researcher reads first ----------------------------------------------------------------

BASELINE = Path(__file__).resolve().parents[1] / "reports" / "baseline" / "report.json"


def test_every_heading_of_the_page_has_an_anchor():
    html = render_html(rp.rederive(json.loads(BASELINE.read_text())), BASELINE.parent)
    headings = re.findall(r"<h[1-3][^>]*>", html)
    assert len(headings) > 20
    assert all(h.startswith("<h1") or " id=" in h for h in headings), [h for h in headings if " id=" not in h]
    # problems open, the rest (tests without a problem, models, the test list) collapsed
    assert html.count("<details") > 80
    assert '<details class="test bad" id="m-hypotheses-test_assoc_memory-py-test_capacity_lower_bound" open>' in html
    assert '<details class="test" id="m-hypotheses-test_example-py-test_head_2_0_reads_position_1">' in html


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_the_full_runs_page_fits_in_20000_px_at_1400_px_wide(tmp_path):
    """The committed baseline is a full run (every module, 572 tests); its page as it opens, laid out by
    headless Chromium at 1,400 px wide, is at most 20,000 px tall (it was 97,120 px before issue 32)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "screenshot_report", Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    page = tmp_path / "report.html"
    page.write_text(render_html(rp.rederive(json.loads(BASELINE.read_text())), BASELINE.parent))
    height = shot.page_height(page, width=1400)
    assert 2000 < height <= 20_000, height
