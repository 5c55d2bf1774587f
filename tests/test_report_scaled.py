"""The scaled fp8/fp4 formats in the HTML report, read as a user reads them: heatmap columns, each case's
quantized matmul inputs (SQNR, flush, saturation, scales) and the recipes compared side by side."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest

from precision_suite import Matrix, Results, run_matrix
from precision_suite.report import render_report, write_report

from test_report import CHROMIUM, HOSTILE, Chromium, _blob, _cell_lines, _dom  # noqa: E402 - the shared helpers

# given out of order on purpose: the heatmap orders them
FORMATS = "nvfp4,fp8_tensor,fp16,mxfp4,fp8_block,mxfp8_e4m3,fp8_e4m3fn,mxfp4(scale_rule=ceil)"
# plain formats by width, then the recipes: per tensor, per block, MX, NV (a parameterised variant after its default)
COLUMN_ORDER = ["fp16", "fp8_e4m3fn", "fp8_tensor", "fp8_block", "mxfp8_e4m3", "mxfp4", "mxfp4(scale_rule=ceil)", "nvfp4"]
BLOCK = {"fp8_tensor": "per tensor", "fp8_block": "1×128", "mxfp8_e4m3": "1×32", "mxfp4": "1×32",
         "mxfp4(scale_rule=ceil)": "1×32", "nvfp4": "1×16"}
SCALED = [f for f in COLUMN_ORDER if f in BLOCK]
E8M0 = ml_dtypes.finfo(ml_dtypes.float8_e8m0fnu)
E4M3 = ml_dtypes.finfo(ml_dtypes.float8_e4m3fn)


@pytest.fixture(scope="module")
def scaled() -> Results:
    """Two inits x every recipe x {normal, outliers at 1e4}: outliers grow the chain until the bf16
    storage overflows (forward, and in the gradients first for some), and fp4 flushes from layer 1."""
    matrix = Matrix.from_options(inits="normal,kaiming_normal", activations="relu", formats=FORMATS,
                                 inputs="normal,outliers(scale=10000)", depth="16", width="128", batch="16",
                                 devices="cpu")
    res = run_matrix(matrix)
    recipes = [r for r in res.cases if r.case.format in BLOCK]
    assert all(r.status == "ok" for r in res.cases)
    assert {r.failure["direction"] for r in recipes if r.failure} == {"forward", "backward"}, \
        "the fixture run no longer has scaled cases failing in each direction"
    assert any(r.forward.events.first_flush for r in recipes) and any(r.failure is None for r in recipes)
    return res


@pytest.fixture(scope="module")
def page(scaled) -> str:
    return render_report(scaled)


def _failure_text(r) -> str:
    """What a cell's first line says, from the results' failure alone (``∇`` before a backward one)."""
    f = r.failure
    if f is None:
        return f"survived {r.case.depth}"
    assert f["kind"] != "zero"  # says why it died: not in this fixture
    return ("∇ " if f["direction"] == "backward" else "") + f"{f['kind']} @ {f['layer']}"


def _sqnr(qerr) -> list:
    """-20 log10(qerr), computed here; None where qerr is 0, inf or NaN."""
    out = []
    for q in np.asarray(qerr, dtype=np.float64).tolist():
        out.append(-20.0 * math.log10(q) if math.isfinite(q) and q > 0 else None)
    return out


def _close(page_values, expected, abs_tol):
    assert len(page_values) == len(expected)
    for got, want in zip(page_values, expected):
        if want is None or not math.isfinite(want):
            assert got is None
        else:
            assert got == pytest.approx(want, abs=abs_tol)


def _sections(dom) -> dict:
    return {d.attrs["data-id"]: d for d in dom.find_all("details", cls="case")}


# ---------------------------------------------------------------- heatmap

def test_recipe_columns_sit_beside_the_plain_formats_with_their_failures(scaled, page):
    dom = _dom(page)
    groups = list(dom.find_all("section", cls="group"))
    assert len(groups) == 2  # one per input
    by_id = scaled.by_id()
    for g in groups:
        heads = list(g.find_all("th", scope="col"))[1:]  # after the init column
        names = [th.text[0].strip() for th in heads]  # the header's own text, before its recipe line
        assert names == COLUMN_ORDER
        for th, name in zip(heads, names):
            sub = [s.all_text() for s in th.find_all("span", cls="recipe")]
            assert sub == ([] if name not in BLOCK else [sub[0]]) and (name not in BLOCK or BLOCK[name] in sub[0])
        for cell in g.find_all("td", cls="cell"):
            r = by_id[cell.attrs["data-id"]]
            lines = _cell_lines(cell)
            assert lines[0] == _failure_text(r)
            flush = [s.all_text() for s in cell.find_all("span", cls="flush")]
            fwd, bwd = r.forward.events.first_flush, r.backward.events.first_flush
            if r.case.format not in BLOCK or (fwd is None and bwd is None):
                assert flush == []
            else:
                parts = ([f"@ {fwd}"] if fwd is not None else []) + ([f"∇ @ {bwd}"] if bwd is not None else [])
                assert flush == ["flushed " + " · ".join(parts)]
    summary = [li.all_text().split(":")[0] for li in next(dom.find_all("ul", cls="verdicts")).find_all("li")]
    assert summary == COLUMN_ORDER


# ---------------------------------------------------------------- one scaled case

def test_a_scaled_case_charts_sqnr_flush_and_scales_from_its_results(scaled, page):
    dom = _dom(page)
    blob = _blob(dom)
    sections = _sections(dom)
    f32 = np.finfo(np.float32)
    for i, r in enumerate(scaled.cases):
        charts = blob["cases"][i]
        kinds = {c.attrs["data-kind"] for c in sections[r.id].find_all("div", cls="chart")}
        if r.case.format not in BLOCK:
            assert not {"q", "qf", "qs"} & set(charts) and kinds == {"f", "ff", "b", "bf"}
            assert not list(sections[r.id].find_all("div", cls="quant"))
            continue
        assert kinds == {"f", "ff", "b", "bf", "q", "qf", "qs"}
        for name, stats in (("gemm_in", r.forward.gemm_in), ("gemm_w", r.forward.gemm_w),
                            ("grad_gemm_in", r.backward.grad_gemm_in)):
            assert len(charts["q"][f"{name}.all"]) == r.case.depth
            _close(charts["q"][f"{name}.all"], _sqnr(stats["qerr"]), 0.006)
            _close(charts["q"][f"{name}.bulk"], _sqnr(stats["qerr_bulk"]), 0.006)
            _close(charts["qf"][f"{name}.flushed"], list(stats["flush_frac"]), 6e-6)
            _close(charts["qf"][f"{name}.saturated"], list(stats["saturated_frac"]), 6e-6)
            _close(charts["qs"][f"{name}.min"], list(stats["scale_log2_min"]), 0.006)
            _close(charts["qs"][f"{name}.max"], list(stats["scale_log2_max"]), 0.006)
            if r.case.format == "nvfp4":  # the E4M3 block scales' floor under each tensor's largest scale
                floor = np.asarray(stats["scale_log2_max"]) - math.log2(float(E4M3.max) / float(E4M3.smallest_subnormal))
                _close(charts["qs"][f"{name}.floor"], floor.tolist(), 0.006)
        band = charts["qband"]
        if r.case.format.startswith("mxfp"):
            assert (band["lo"], band["hi"]) == (math.log2(float(E8M0.smallest_normal)), math.log2(float(E8M0.max)))
        elif r.case.format == "nvfp4":
            assert band is None
        else:  # fp32 scales: the reciprocal max_elem / amax overflows fp32 below 1 / fp32 max
            assert band["lo"] == pytest.approx(-math.log2(float(f32.max))) and band["hi"] == pytest.approx(128, abs=1e-6)


def test_a_scaled_case_table_names_its_worst_sqnr_and_flush(scaled, page):
    sections = _sections(_dom(page))
    for r in scaled.cases:
        if r.case.format not in BLOCK:
            continue
        rows = {tr.attrs["data-tensor"]: [td.all_text() for td in tr.find_all("td")]
                for tr in sections[r.id].find_all("tr") if "data-tensor" in tr.attrs}
        assert list(rows) == ["gemm_in", "gemm_w", "grad_gemm_in"]
        for name, stats in (("gemm_in", r.forward.gemm_in), ("grad_gemm_in", r.backward.grad_gemm_in)):
            db = [v for v in _sqnr(stats["qerr"])]
            finite = [(v, k + 1) for k, v in enumerate(db) if v is not None]
            worst, at = min(finite)
            assert rows[name][1] == f"{worst:.1f} ({at})"
            flushed = np.asarray(stats["flush_frac"])
            most = f"{100 * flushed.max():.3g}%"
            assert rows[name][4] == (most if flushed.max() == 0 else f"{most} ({int(np.argmax(flushed)) + 1})")
        warnings = next(sections[r.id].find_all("p", cls="warn")).all_text() if r.forward.events.first_flush else ""
        if r.forward.events.first_flush is not None:
            assert f"flushed ≥ 0.01 from layer {r.forward.events.first_flush}" in warnings


# ---------------------------------------------------------------- the recipes side by side

def test_the_recipes_view_lists_every_recipe_for_each_init(scaled, page):
    dom = _dom(page)
    section = next(dom.find_all("section", id="recipes"))
    blob = _blob(dom)
    inputs = list(dict.fromkeys(r.case.input for r in scaled.cases))
    blocks = {b.attrs["data-init"]: b for b in section.find_all("div", cls="recipe-init")}
    assert set(blocks) == {r.case.init for r in scaled.cases}
    for init, block in blocks.items():
        mine = {(r.case.format, r.case.input): r for r in scaled.cases if r.case.init == init and r.case.format in BLOCK}
        rows = [tr for tr in next(block.find_all("tbody")).find_all("tr")]
        keys = [(next(tr.find_all("th")).all_text(), tr.find_all("td").__next__().all_text()) for tr in rows]
        assert keys == [(f, inp) for f in SCALED for inp in inputs]  # every recipe, each input beside it
        depth = scaled.cases[0].case.depth
        layers = [1, (depth + 1) // 2, depth]
        for tr, key in zip(rows, keys):
            r = mine[key]
            cells = [td.all_text() for td in tr.find_all("td")]
            assert cells[1] == _failure_text(r)
            fwd, bwd = r.forward.events.first_flush, r.backward.events.first_flush
            assert cells[2] == " · ".join(([f"fwd @ {fwd}"] if fwd is not None else []) +
                                          ([f"∇ @ {bwd}"] if bwd is not None else [])) or cells[2] == "—"
            for stats, texts in ((r.forward.gemm_in, cells[3:6]), (r.backward.grad_gemm_in, cells[6:9])):
                a, b = _sqnr(stats["qerr"]), _sqnr(stats["qerr_bulk"])
                assert texts == [f"{'—' if a[L - 1] is None else f'{a[L - 1]:.1f}'} / "
                                 f"{'—' if b[L - 1] is None else f'{b[L - 1]:.1f}'}" for L in layers]
        # one chart per input, one line per recipe, each line the bulk SQNR of that case's gemm_in
        charts = [blob["recipes"][int(c.attrs["data-recipes"])] for c in block.find_all("div", cls="chart")]
        assert len(charts) == len(inputs)
        colour = {}
        for inp, chart in zip(inputs, charts):
            members = [scaled.cases[i] for i in chart["cases"]]
            assert [(m.case.format, m.case.input, m.case.init) for m in members] == [(f, inp, init) for f in SCALED]
            assert [label.split(" · ")[0] for label in chart["labels"]] == SCALED
            for m, k in zip(members, chart["colours"]):
                assert colour.setdefault(m.case.format, k) == k  # a recipe keeps its colour across the inputs
            lo, hi = chart["yrange"]
            for m in members:
                bulk = [v for v in _sqnr(m.forward.gemm_in["qerr_bulk"]) if v is not None]
                assert lo <= min(bulk) and max(bulk) <= hi


def test_a_plain_run_has_no_scaled_parts(scaled):
    plain = replace(scaled, cases=tuple(r for r in scaled.cases if r.case.format not in BLOCK))
    text = render_report(plain)
    dom = _dom(text)
    assert not list(dom.find_all("section", id="recipes")) and 'href="#recipes"' not in text
    assert not list(dom.find_all("div", id="recipe-formats")) and not list(dom.find_all("div", cls="quant"))
    assert not list(dom.find_all("span", cls="flush")) and not list(dom.find_all("span", cls="recipe"))
    blob = _blob(dom)
    assert blob["recipes"] == [] and not any({"q", "qf", "qs"} & set(c) for c in blob["cases"])
    assert "quantized input flushed" not in text  # the event row and the warnings are the scaled formats'


def test_hostile_names_in_the_recipes_view_come_out_escaped(scaled):
    cases = []
    for r in scaled.cases:
        c = r.case
        if c.init == "normal":
            c = replace(c)
            object.__setattr__(c, "init", HOSTILE)  # bypass validation: the renderer must escape anyway
        cases.append(replace(r, case=c))
    text = render_report(replace(scaled, cases=tuple(cases)))
    assert HOSTILE not in text and "<script>alert" not in text
    section = next(_dom(text).find_all("section", id="recipes"))
    assert HOSTILE in {b.attrs["data-init"] for b in section.find_all("div", cls="recipe-init")}
    assert HOSTILE in section.all_text()


# ---------------------------------------------------------------- in a real browser

_DRAWN = "[...document.querySelectorAll('%s .chart')].every(el => el.querySelector('canvas'))"
# per chart: its kind and which of the given line colours (r, g, b) it painted at full opacity
_CHARTS_OF = """((colours) => {
    return [...document.querySelectorAll('%s .chart')].map(el => {
        const c = el.querySelector('canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = colours.map(() => false);
        for (let i = 0; i < d.length; i += 4) {
            if (d[i + 3] !== 255) continue;
            colours.forEach((rgb, k) => { if (d[i] === rgb[0] && d[i + 1] === rgb[1] && d[i + 2] === rgb[2]) seen[k] = true; });
        }
        return [el.dataset.kind || 'recipes', seen];
    });
})(%s)"""
# report.js's colours: the quantized inputs (gemm_in, gemm_w, grad_gemm_in); the first six recipe lines
_QUANT_RGB = [[0x1f, 0x77, 0xb4], [0xe8, 0x71, 0x0a], [0x2a, 0x9d, 0x3a]]
_RECIPE_RGB = [[0x1f, 0x77, 0xb4], [0xe8, 0x71, 0x0a], [0x2a, 0x9d, 0x3a], [0xd6, 0x27, 0x28], [0x8e, 0x44, 0xad],
               [0x8c, 0x56, 0x4b]]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_a_scaled_case_and_the_recipes_draw_in_headless_chromium(scaled, tmp_path):
    """The charts of a scaled case (an fp4 case that flushes from layer 1) and of the recipes view draw their
    lines: every quantized input's colour on the SQNR, flush and scale charts, every recipe's on the
    comparison charts, with no console message and no script error."""
    path = write_report(scaled, tmp_path / "report.html")
    case = next(r for r in scaled.cases if (r.case.format, r.case.input, r.case.init) == ("mxfp4", "normal", "kaiming_normal"))
    assert case.forward.events.first_flush == 1 and case.failure is None
    anchor = next(d.attrs["id"] for d in _dom(path.read_text()).find_all("details", cls="case")
                  if d.attrs["data-id"] == case.id)
    browser = Chromium(CHROMIUM, 1400, 3000)
    try:
        browser.open(f"file://{path}")
        # the link to the case opens its section (the page's hashchange handler); the recipes are scrolled to
        for target, scope, colours, expected in (
                (anchor, f'details[id="{anchor}"]', _QUANT_RGB, ["f", "ff", "b", "bf", "q", "qf", "qs"]),
                ("recipes-0", "#recipes-0 .recipe-init:first-of-type", _RECIPE_RGB, ["recipes"] * 2)):
            browser.evaluate(f"location.hash = '#{target}'; document.getElementById('{target}').scrollIntoView()")
            deadline = time.monotonic() + 30
            while not browser.evaluate(_DRAWN % scope) and time.monotonic() < deadline:
                time.sleep(0.05)
            drawn = browser.evaluate(_CHARTS_OF % (scope, colours))  # read once: polling pixels warns on the console
            assert [k for k, _ in drawn] == expected
            for kind, seen in drawn:
                if kind in ("q", "qf", "qs", "recipes"):
                    assert all(seen), (kind, seen)  # a line in every colour: no series left undrawn
        assert browser.evaluate(f"document.getElementById('{anchor}').open") is True
        assert browser.problems() == []
        assert browser.evaluate("document.getElementById('script-error').hidden") is True
    finally:
        browser.close()
