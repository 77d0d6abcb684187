"""report.py / report_html.py / figures.py without pytest-in-pytest: collector, writing, compare, baseline."""

import json
from types import SimpleNamespace

import pytest

from circuits import report as rp
from circuits.claims import Claims
from circuits.figures import Figures, FigureNameError, render_png, training_curves_svg
from circuits.report_html import render_html


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
    assert cmp_["counts"] == {"matched": 3, "flipped": 2, "to_fail": 1, "to_pass": 1}
    assert [r["name"] for r in cmp_["moved"]][0] == "a" and cmp_["moved"][0]["delta"] == pytest.approx(0.5)
    assert [c["name"] for c in cmp_["added"]] == ["new"] and [c["name"] for c in cmp_["removed"]] == ["gone"]
    md = rp._compare_md(cmp_)
    assert any("⇄" in line for line in md)


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
    assert (tmp_path / "reports" / "latest").read_text().strip() == "r1"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left behind
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 1 and html.count("<svg") == 1  # the figure + the training curve
    assert "pattern &lt;b&gt;" in html and "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html
    md = paths["md"].read_text()
    assert "| test | claim | measured | op | threshold | margin | result | controls |" in md
    assert "`r`" in md and "❌ **FAIL**" in md and "untrained ✗ held" in md


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
    assert rp.main(["baseline", "r1", "--report-dir", str(reports)]) == 0
    assert rp.main(["baseline", "zzz", "--report-dir", str(reports)]) == 2
    assert "no report for 'zzz'" in capsys.readouterr().err


def test_terminal_lines_and_margins():
    report = sample_collector().build(run_id="r1")
    lines = [text for text, _ in rp.terminal_lines(report)]
    assert lines[0].split() == ["test", "claim", "measured", "op", "threshold", "margin", "result"]
    assert any("↳ control untrained" in ln and "NO TEETH" in ln for ln in lines)
    assert any(ln.startswith("test_acc") and ln.rstrip().endswith("FAIL") and "−0.28" in ln for ln in lines)
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
