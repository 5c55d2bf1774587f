"""The HTML report as a user reads it: built from a real run, parsed, escaped, and opened in Chromium."""

from __future__ import annotations

import base64
import copy
import http.server
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from html.parser import HTMLParser

import ml_dtypes
import numpy as np
import pytest

from precision_suite import Matrix, Results, load_results, run_matrix
from precision_suite.cli import main
from precision_suite.report import render_report, write_report
from precision_suite.stats import Events
from precision_suite.summary import describe_case_failure, describe_failure

HOSTILE = '<script>alert("pwned")</script>\'"&amp;'
FINFO = {"fp16": np.finfo(np.float16), "bf16": ml_dtypes.finfo(ml_dtypes.bfloat16)}


@pytest.fixture(scope="module")
def results() -> Results:
    """A real run with every headline outcome: N(0,1) overflows, lecun x 0.5 underflows, kaiming survives."""
    matrix = Matrix.from_options(inits="normal,kaiming_normal,lecun_normal(gain=0.5)", activations="relu,tanh",
                                 formats="fp16,bf16", depth="24", width="32", batch="8", devices="cpu")
    res = run_matrix(matrix)
    kinds = {r.forward.events.failure and r.forward.events.failure["kind"] for r in res.cases}
    assert {None, "overflow", "underflow"} <= kinds, "the fixture run no longer shows every outcome"
    assert any(r.failure is None for r in res.cases), "the fixture run no longer has a case surviving both ways"
    return res


GREEN = "hsl(130, 50%, 80%)"  # survives the depth


def _gradients_fail(results: Results) -> tuple[Results, str]:
    """The results with one both-ways survivor's gradients turned NaN from the top layer down."""
    i = next(i for i, r in enumerate(results.cases) if r.failure is None)
    r = results.cases[i]
    d = r.case.depth
    nan = Events(first_nan=d, failure={"layer": d, "kind": "nan"})
    cases = list(results.cases)
    cases[i] = replace(r, backward=replace(r.backward, events=nan))
    return replace(results, cases=tuple(cases)), r.id


@pytest.fixture(scope="module")
def page(results) -> str:
    return render_report(results)


# ---------------------------------------------------------------- a tiny DOM over html.parser

class _Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], []

    def all_text(self) -> str:
        return "".join(t if isinstance(t, str) else t.all_text() for t in self.text)

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag=None, cls=None, **attrs):
        for n in self.iter():
            if tag and n.tag != tag:
                continue
            if cls and cls not in (n.attrs.get("class") or "").split():
                continue
            if all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                yield n


class _Dom(HTMLParser):
    VOID = frozenset({"meta", "input", "br", "img", "link", "hr"})

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = _Node("#root", {}, None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        self.cur.text.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.text.append(data)


def _dom(text) -> _Node:
    return _Dom(text).root


def _blob(dom) -> dict:
    return json.loads(next(dom.find_all("script", id="report-data")).all_text())


def _cell_lines(cell) -> list[str]:
    return [s.all_text().strip() for s in cell.find_all("span")]


def _predicted(theory) -> str:
    """What a heatmap cell should say theory predicts: the earliest predicted forward event."""
    if not theory or not theory.get("applicable"):
        return "no prediction"
    found = [(theory[key], rank, kind) for rank, (kind, key) in
             enumerate((("overflow", "first_overflow"), ("dead", "first_zero"), ("underflow", "first_underflow")))
             if theory.get(key) is not None]
    if not found:
        return "survives"
    layer, _, kind = min(found)
    return f"{kind} @ {layer}"


# ---------------------------------------------------------------- content

def test_heatmap_lists_every_case_with_its_failure_layer(results, page):
    dom = _dom(page)
    cells = {c.attrs["data-id"]: c for c in dom.find_all("td", cls="cell") if "data-id" in c.attrs}
    assert set(cells) == {r.id for r in results.cases}
    for r in results.cases:
        lines = _cell_lines(cells[r.id])
        assert lines[0] == describe_case_failure(r)
        failure = r.failure
        if failure:
            assert lines[0].endswith(f"@ {failure['layer']}") and failure["kind"] in lines[0]
            assert lines[0].startswith("∇ ") == (failure["direction"] == "backward")
            assert GREEN not in cells[r.id].attrs["style"]
        else:
            assert lines[0] == f"survived {r.case.depth}" and GREEN in cells[r.id].attrs["style"]
        assert lines[1] == "theory: " + _predicted(r.theory)
        if failure and failure["direction"] == "backward":
            assert lines[2] == "fwd " + describe_failure(r.forward.events, r.case.depth)
        else:
            assert lines[2] == "∇ " + describe_failure(r.backward.events, r.case.depth)
        assert next(cells[r.id].find_all("a")).attrs["href"] == "#" + next(
            d for d in dom.find_all("details", cls="case") if d.attrs["data-id"] == r.id).attrs["id"]
    titles = [h.all_text() for h in dom.find_all("h2")]
    assert any(t.endswith("relu") for t in titles) and any(t.endswith("tanh") for t in titles)
    columns = [th.all_text() for th in dom.find_all("th", scope="col")]
    assert columns.count("fp16") == 2 and columns.count("bf16") == 2


def test_a_case_whose_gradients_fail_is_not_green(results):
    res, case_id = _gradients_fail(results)
    dom = _dom(render_report(res))
    cell = next(c for c in dom.find_all("td", cls="cell") if c.attrs.get("data-id") == case_id)
    depth = res.by_id()[case_id].case.depth
    assert _cell_lines(cell)[0] == f"∇ nan @ {depth}" and cell.attrs["data-direction"] == "backward"
    assert cell.attrs["style"] == "background: hsl(4, 85%, 68%)"  # survived depth - depth = 0 layers: red
    header = next(dom.find_all("p", cls="meta")).all_text()
    n_fail = sum(r.failure is not None for r in res.cases)
    assert f"{n_fail} fail" in header and "backward first" in header


def test_verdict_per_format_counts_the_failures(results, page):
    dom = _dom(page)
    verdicts = {li.all_text().split(":")[0]: li.all_text() for ul in dom.find_all("ul", cls="verdicts")
                for li in ul.find_all("li")}
    for fmt in ("fp16", "bf16"):
        cases = [r for r in results.cases if r.case.format == fmt]
        failing = sum(r.failure is not None for r in cases)
        expected = f"{failing} of {len(cases)} cases fail" if failing else f"all {len(cases)} cases survive"
        assert expected in verdicts[fmt]
    survivors = {r.case.init for r in results.cases if r.case.format == "fp16"} - {
        r.case.init for r in results.cases if r.case.format == "fp16" and r.failure is not None}
    assert all(init in verdicts["fp16"].split("Survive every")[-1] for init in survivors)


def test_every_case_has_a_section_with_its_events_and_charts(results, page):
    dom = _dom(page)
    sections = {d.attrs["data-id"]: d for d in dom.find_all("details", cls="case")}
    assert set(sections) == {r.id for r in results.cases}
    blob = _blob(dom)
    for i, r in enumerate(results.cases):
        sec = sections[r.id]
        assert sec.attrs["id"].startswith("case-") and sec.attrs["data-index"] == str(i)
        kinds = {c.attrs["data-kind"] for c in sec.find_all("div", cls="chart")}
        assert kinds == {"f", "ff", "b", "bf"}
        text = sec.all_text()
        assert "Headroom in bits" in text and "Loss-scale advice" in text
        advice = r.backward.loss_scale
        assert (advice["verdict"] if advice else "no loss-scale advice in these results") in text
        rows = {tr.children[0].all_text(): [td.all_text() for td in tr.children[1:]]
                for tr in next(sec.find_all("table", cls="events")).find_all("tr") if tr.children[0].tag == "th"}
        first = r.forward.events.first_overflow
        assert rows["overflow"][0] == ("—" if first is None else str(first))
        # the chart data is the case's own numbers, as log2 |value|; x = 0 is the input
        if r.forward.post.get("flush_frac") is not None:  # flushed beside underflow, subnormal, zero
            assert {"post.underflow", "post.flushed", "post.subnormal", "post.zero"} <= set(blob["cases"][i]["ff"])
        post_rms = blob["cases"][i]["f"]["post.rms"]
        assert len(post_rms) == r.case.depth + 1
        finite = np.isfinite(r.forward.post["rms"]) & (r.forward.post["rms"] > 0)
        k = int(np.flatnonzero(finite)[0])
        assert post_rms[k + 1] == pytest.approx(math.log2(r.forward.post["rms"][k]), abs=0.006)


def test_theory_from_the_run_is_shown_beside_measured(results, page):
    sections = {d.attrs["data-id"]: d for d in _dom(page).find_all("details", cls="case")}
    with_theory = [r for r in results.cases if r.theory and r.theory.get("applicable")]
    assert with_theory, "the engine attaches theory predictions to zero-mean inits"
    for r in with_theory:
        sec = sections[r.id]
        rows = {tr.children[0].all_text(): [td.all_text() for td in tr.children[1:]]
                for tr in next(sec.find_all("table", cls="events")).find_all("tr") if tr.children[0].tag == "th"}
        predicted = r.theory["first_overflow"]
        assert rows["overflow"][1] == ("never" if predicted is None else str(predicted))
        back = r.theory.get("backward") or {}
        if back.get("applicable"):
            predicted = back["first_underflow"]
            assert rows["underflow ≥ threshold"][3] == ("never" if predicted is None else str(predicted))
        else:
            assert rows["overflow"][3] == ""
            assert "Theory, backward: no prediction — " + (back.get("reason") or "") in sec.all_text()


def test_bands_sit_at_finfo_values(page):
    dom = _dom(page)
    formats = _blob(dom)["formats"]
    for name, info in FINFO.items():
        f = formats[name]
        assert f["max"] == float(info.max)
        assert f["smallest_normal"] == float(info.smallest_normal)
        assert f["smallest_subnormal"] == float(info.smallest_subnormal)
        assert f["log2_max"] == math.log2(float(info.max))
        assert f["log2_normal"] == math.log2(float(info.smallest_normal))
        assert f["log2_subnormal"] == math.log2(float(info.smallest_subnormal))
    assert formats["fp16"]["overflow_threshold"] == 65520.0  # max + ulp(max)/2
    table = next(dom.find_all("section", id="formats")).all_text()
    assert "65504" in table and "5.96046e-08" in table and "6.10352e-05" in table


def test_comparison_plot_per_activation_and_format_holds_every_init(results, page):
    blob = _blob(_dom(page))
    for cmp in blob["comparisons"]:
        members = [results.cases[i] for i in cmp["cases"]]
        assert {r.case.format for r in members} == {cmp["format"]}
        assert len({r.case.activation for r in members}) == 1
        assert cmp["labels"] == [f"{r.case.init} · {describe_case_failure(r)}" for r in members]
    assert len(blob["comparisons"]) == 4  # 2 activations x 2 formats


def test_nothing_references_the_network(page):
    dom = _dom(page)
    for node in dom.iter():
        for attr in ("src", "href", "action", "poster", "data"):
            value = node.attrs.get(attr)
            if value is not None:
                assert attr == "href" and value.startswith("#"), f"<{node.tag} {attr}={value!r}>"
        assert node.tag not in ("link", "iframe", "img", "object", "embed")
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    assert "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page)


def test_hostile_strings_come_out_escaped(results):
    hostile_case = copy.copy(results.cases[0].case)
    object.__setattr__(hostile_case, "init", HOSTILE)  # bypass validation: the renderer must escape anyway
    cases = list(results.cases)
    cases[0] = replace(cases[0], case=hostile_case,
                       theory={"applicable": False, "reason": HOSTILE})
    cases[1] = replace(cases[1], status="error", error=HOSTILE, forward=None, backward=None)
    env = {**results.environment, "label": HOSTILE, "cuda": {"device": HOSTILE}}
    text = render_report(Results(tuple(cases), env, created=HOSTILE, tool_version="0.1.0"),
                         baseline=Results(tuple(cases), {"label": "old"}))
    assert HOSTILE not in text
    assert "<script>alert" not in text
    assert text.count("<script") == 4  # the error hook, the data blob, uPlot, the page script
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;&#39;&#34;&amp;amp;" in text
    dom = _dom(text)
    blob_text = next(dom.find_all("script", id="report-data")).all_text()
    assert "<" not in blob_text and ">" not in blob_text
    assert json.loads(blob_text)["cases"][0]["id"].split("-")[1] == HOSTILE  # it arrived, escaped as JSON
    assert HOSTILE in dom.all_text()  # and a reader sees the string as text
    anchors = [d.attrs["id"] for d in dom.find_all("details", cls="case")]
    assert all(re.fullmatch(r"case-[A-Za-z0-9_.-]+", a) for a in anchors)


# ---------------------------------------------------------------- theory and loss scale

def _with_theory(results: Results) -> Results:
    cases = []
    for i, r in enumerate(results.cases):
        d = r.case.depth
        if i % 3 == 0:
            theory = {"applicable": True, "reason": None, "first_overflow": 7, "first_underflow": None,
                      "first_zero": None, "rms": [2.0 ** (0.5 * k) for k in range(d)],
                      "backward": {"first_overflow": None, "first_underflow": 3, "first_zero": None,
                                   "rms": [1.0] * d}}
        elif i % 3 == 1:
            theory = {"applicable": False, "reason": "tanh saturates: the Gaussian picture does not hold",
                      "first_overflow": None, "first_underflow": None, "first_zero": None, "rms": None,
                      "backward": None}
        else:
            theory = None
        advice = {"max_safe_scale": 2.0 ** 10, "min_useful_scale": 2.0 ** 4, "recommended": 2.0 ** 8,
                  "gradscaler_backoffs": 6, "verdict": "a static scale of 2^8 keeps every gradient in range."}
        cases.append(replace(r, theory=theory, backward=replace(r.backward, loss_scale=advice)))
    return replace(results, cases=tuple(cases))


def test_theory_and_loss_scale_shown_when_present_and_said_when_absent(results):
    res = _with_theory(results)
    dom = _dom(render_report(res))
    cells = {c.attrs["data-id"]: _cell_lines(c) for c in dom.find_all("td", cls="cell") if "data-id" in c.attrs}
    sections = {d.attrs["data-id"]: d for d in dom.find_all("details", cls="case")}
    blob = _blob(dom)
    for i, r in enumerate(res.cases):
        text = sections[r.id].all_text()
        if i % 3 == 0:
            assert cells[r.id][1] == "theory: overflow @ 7"
            assert blob["cases"][i]["ft"]["theory rms (pre)"][2] == 1.0  # log2 of 2**(0.5*2)
            assert {"x": 7, "label": "theory overflow", "kind": "theory"} in blob["cases"][i]["fm"]
        else:
            assert cells[r.id][1] == "theory: no prediction"
            assert "Theory: no prediction" in text
            if i % 3 == 1:
                assert "tanh saturates" in text
        assert "2^8 (256)" in text and "a static scale of 2^8 keeps every gradient in range." in text


# ---------------------------------------------------------------- baseline

def _moved(results: Results, index: int, layer: int) -> Results:
    cases = list(results.cases)
    r = cases[index]
    events = replace(r.forward.events, first_overflow=layer, failure={"layer": layer, "kind": "overflow"})
    cases[index] = replace(r, forward=replace(r.forward, events=events))
    return replace(results, cases=tuple(cases), environments=({**results.environment, "torch": "0.0-old"},))


def test_baseline_diff_lists_moved_cases(results):
    survivor = next(i for i, r in enumerate(results.cases) if r.failure is None)
    baseline = _moved(results, survivor, 3)
    dom = _dom(render_report(results, baseline=baseline))
    section = next(dom.find_all("section", id="baseline"))
    rows = [[td.all_text() for td in tr.find_all("td")] for tr in next(section.find_all("table", cls="diff")).find_all("tr")]
    rows = [r for r in rows if r]
    case_id = results.cases[survivor].id
    assert [case_id, "forward", "failure", "overflow @ 3", "none", "", "moved"] in rows
    assert [case_id, "forward", "overflow", "3", "—", "", "moved"] in rows
    assert {r[0] for r in rows} == {case_id}
    assert "torch" in section.all_text() and "0.0-old" in section.all_text()
    same = next(_dom(render_report(results, baseline=results)).find_all("section", id="baseline")).all_text()
    assert "no event moved" in same and "identical" in same
    assert not list(_dom(render_report(results)).find_all("section", id="baseline"))


def test_baseline_warnings_are_shown_not_judged(results):
    cases = list(results.cases)
    r = cases[0]
    cases[0] = replace(r, forward=replace(r.forward, events=replace(r.forward.events, first_subnormal=1)))
    section = next(_dom(render_report(results, baseline=replace(results, cases=tuple(cases)))).find_all(
        "section", id="baseline"))
    rows = [[td.all_text() for td in tr.find_all("td")] for tr in next(section.find_all("table", cls="diff")).find_all("tr")]
    assert [r.id, "forward", "subnormal ≥ threshold", "1", _event(r.forward.events.first_subnormal), "",
            "warning, not judged"] in rows
    assert "no event moved" in section.all_text()


def test_baseline_section_says_what_compare_says(results):
    """The diff section is ``compare``'s verdict: the same drifted statistics (here: one layer's rms
    doubled, 1 bit, beyond the 0.25-bit default), and when no case matches, compare's message."""
    from precision_suite.compare import compare

    i = next(i for i, r in enumerate(results.cases) if r.status == "ok" and r.failure is None)
    cases = list(results.cases)
    r = cases[i]
    rms = list(r.forward.post["rms"])
    rms[1] *= 2.0
    cases[i] = replace(r, forward=replace(r.forward, post={**r.forward.post, "rms": rms}))
    baseline = replace(results, cases=tuple(cases))
    expected = compare(baseline, results).drift
    assert [(d.case_id, d.tensor, d.stat, d.layer) for d in expected] == [(r.id, "post", "rms", 2)]
    section = next(_dom(render_report(results, baseline=baseline)).find_all("section", id="baseline"))
    tables = list(section.find_all("table", cls="diff"))
    rows = [[td.all_text() for td in tr.find_all("td")] for t in tables for tr in t.find_all("tr")]
    assert [r.id, "post.rms", "2", f"{rms[1]:.4g}", f"{rms[1] / 2:.4g}", "1 bits"] in rows
    assert "no event moved" in section.all_text()
    renamed = tuple(replace(c, case=replace(c.case, seed=c.case.seed + 1)) for c in results.cases)
    lonely = next(_dom(render_report(results, baseline=replace(results, cases=renamed))).find_all(
        "section", id="baseline")).all_text()
    assert "no case of the current run matches one of the baseline" in lonely


def _event(layer) -> str:
    return "—" if layer is None else str(layer)


def test_skipped_case_shows_its_reason(results):
    cases = list(results.cases)
    cases[2] = replace(cases[2], status="skipped", skip_reason="device 'cuda' is not available here",
                       forward=None, backward=None)
    dom = _dom(render_report(replace(results, cases=tuple(cases))))
    section = next(d for d in dom.find_all("details", cls="case") if d.attrs["data-id"] == cases[2].id)
    assert "Skipped: device 'cuda' is not available here." in section.all_text()


# ---------------------------------------------------------------- CLI and writing

def test_cli_report_writes_html_beside_results(results, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results.to_dict()))
    assert main(["report", str(path)]) == 0
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    out = tmp_path / "sub" / "r.html"
    base = tmp_path / "base.json"
    base.write_text(json.dumps(_moved(load_results(path), 0, 2).to_dict()))
    assert main(["report", str(path), "-o", str(out), "--baseline", str(base)]) == 1  # an event moved
    assert 'id="baseline"' in out.read_text()
    printed = capsys.readouterr().out
    assert str(out) in printed and "judged events moved" in printed
    assert main(["report", str(path), "-o", str(out), "--baseline", str(path)]) == 0  # against itself
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text("{not json"), "not valid JSON"),
    (lambda p: p.write_text("[1, 2]"), "is not a precision-suite results file (top level is list)"),
    (lambda p: p.write_text('{"schema": "other"}'), "not a precision-suite results file"),
])
def test_cli_report_bad_input_one_line_exit_2(tmp_path, capsys, make, needle, results):
    bad = tmp_path / "bad.json"
    make(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(results.to_dict()))
    for argv in (["report", str(bad)], ["report", str(good), "--baseline", str(bad)]):
        assert main([*argv, "-o", str(tmp_path / "out.html")]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "out.html").exists()


def test_write_report_is_atomic_and_returns_the_path(results, tmp_path):
    target = tmp_path / "r.html"
    target.write_text("old")
    assert write_report(results, target) == target
    assert target.read_text().rstrip().endswith("</html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # shareable, not the temp file's 0600


# ---------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3/4): stdlib only, no port."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--hide-scrollbars", "--mute-audio")

    def __init__(self, binary: str, width: int = 1400, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="precision-report-chromium-")
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # the protocol reads fd 3 and writes fd 4 in the browser: a tiny exec trampoline moves the pipe ends there
        wire = ("import fcntl, os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); "
                "r2, w2 = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (r, w)); [os.close(fd) for fd in (r, w)]; "
                "os.dup2(r2, 3); os.dup2(w2, 4); os.close(r2); os.close(w2); os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", wire, str(to_chrome_r), str(from_chrome_w), binary,
                                      *self.FLAGS, f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._w, self._r = to_chrome_w, from_chrome_r
        self._buf, self._id, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def call(self, method: str, **params) -> dict:
        return self.send(method, session=self.session, **params)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            msg = self._recv(deadline)
            if msg.get("method") == method:
                return msg
            self.events.append(msg)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def open(self, url: str) -> float:
        """Navigate and wait for the load event; seconds from navigation to load."""
        start = time.perf_counter()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        return time.perf_counter() - start

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def problems(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions, and requests to anything but the file itself."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Runtime.consoleAPICalled" and p["type"] in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p['args']]}")
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry']['text']}")
            elif m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:", "about:")):
                out.append(f"network request: {p['request']['url']}")
        return out

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


def render_in_chromium(html_path, fragment: str = "", width: int = 1400, height: int = 1000,
                       min_charts: int = 1) -> dict:
    """Open a report in headless Chromium; return the seconds to the load event and until ``min_charts``
    charts are drawn, what the page reports, the problems seen and a PNG screenshot."""
    browser = Chromium(CHROMIUM, width, height)
    try:
        start = time.perf_counter()
        load_s = browser.open(f"file://{os.path.abspath(html_path)}{fragment}")
        deadline = time.monotonic() + 30
        while browser.evaluate("window.precisionReport ? window.precisionReport.chartsDrawn() : -1") < min_charts:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        charts_s = time.perf_counter() - start
        info = browser.evaluate("""(() => {
            const canvases = [...document.querySelectorAll('.chart canvas')];
            const inked = canvases.filter(c => {
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true;
                return false;
            }).length;
            return {ready_ms: window.precisionReport && window.precisionReport.readyMs,
                    charts: window.precisionReport ? window.precisionReport.chartsDrawn() : 0,
                    canvases: canvases.length, inked: inked,
                    open: [...document.querySelectorAll('details[open]')].map(d => d.dataset.id),
                    error_banner: !document.getElementById('script-error').hidden};
        })()""")
        return {"load_s": load_s, **info, "problems": browser.problems(), "png": browser.screenshot(),
                "charts_s": charts_s}
    finally:
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_page_renders_in_headless_chromium_without_errors(results, tmp_path):
    from PIL import Image, ImageStat

    path = write_report(_with_theory(results), tmp_path / "report.html")
    failing = next(r for r in results.cases if r.forward.events.failure is not None)
    anchor = next(d.attrs["id"] for d in _dom(path.read_text()).find_all("details", cls="case")
                  if d.attrs["data-id"] == failing.id)
    shot = render_in_chromium(path, fragment=f"#{anchor}", min_charts=4)
    assert shot["problems"] == []
    assert not shot["error_banner"]
    assert shot["open"] == [failing.id]  # the link opened the case's section
    assert shot["charts"] >= 4 and shot["inked"] == shot["charts"]  # its four charts drew something
    image = Image.open(io.BytesIO(shot["png"])).convert("RGB")
    assert image.size == (1400, 1000)
    grey = image.convert("L")
    non_white = sum(grey.histogram()[:240]) / (image.size[0] * image.size[1])
    assert non_white > 0.05, f"screenshot is nearly blank ({non_white:.1%} non-white pixels)"
    assert max(ImageStat.Stat(grey).stddev) > 20
    assert len(image.getcolors(1 << 20) or []) > 50  # text, bands, coloured lines


def test_merged_cpu_and_cuda_shards_show_both_machines(results):
    """A GPU shard merged with a CPU shard keeps both fingerprints; each case says which machine ran it."""
    from precision_suite.results import merge_results

    gpu_env = {**results.environment, "cuda_available": True,
               "cuda": {"device": "NVIDIA H200 (test shard)", "capability": "9.0", "cuda_runtime": "12.8"}}
    gpu = Results(tuple(replace(r, case=replace(r.case, device="cuda")) for r in results.cases[:2]), (gpu_env,))
    merged = merge_results([results, gpu])
    assert merged.environments == (results.environment, gpu_env)
    page = render_report(merged)
    assert "NVIDIA H200 (test shard)" in page and "[1] cuda_available" in page and "[0] cuda_available" in page
    gpu_case = next(r for r in merged.cases if r.case.device == "cuda")
    start = re.search(rf'<details[^>]*data-id="{re.escape(gpu_case.id)}"', page).start()
    section = page[start:page.index("<details", start + 1)]  # up to the next case's section
    assert "<dt>ran on</dt><dd>[1] NVIDIA H200 (test shard) · torch" in section


# sources a CSP directive may list without allowing a network load: nothing, the page's own inline
# scripts and styles, data: URLs. A scheme (https:), a host, *, 'self' (the file's own directory) may load.
_OFFLINE_SOURCES = {"'none'", "'unsafe-inline'", "data:"}


def _policy(page: str) -> dict[str, list[str]]:
    """The page's one Content-Security-Policy, {directive: [sources]}; it must come before any
    script or style (a meta policy governs only what follows it)."""
    metas = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page)
    assert len(metas) == 1, f"{len(metas)} CSP meta tags"
    at = page.index("Content-Security-Policy")
    assert at < page.index("<script") and at < page.index("<style") and at < page.index("</head>")
    directives = [d.split() for d in metas[0].split(";") if d.strip()]
    return {d[0].lower(): d[1:] for d in directives}


def test_page_forbids_every_network_load(results):
    page = render_report(_with_theory(results))
    policy = _policy(page)
    assert policy["default-src"] == ["'none'"]  # whatever no directive names is refused
    assert policy.get("connect-src", ["'none'"]) == ["'none'"]  # fetch, XHR, WebSocket, beacons
    for directive, sources in policy.items():
        assert set(sources) <= _OFFLINE_SOURCES, f"{directive} allows {set(sources) - _OFFLINE_SOURCES}"
    assert not {"report-uri", "report-to"} & set(policy)  # a violation report is itself a request
    assert not re.search(r"""\b(src|href|action|srcset|poster|data)\s*=\s*['"]?\s*(https?:|//|ftp:|wss?:)""", page, re.I)


class _Counting(http.server.BaseHTTPRequestHandler):
    """A local server that counts what reaches it: a request the browser sent is a network load."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server protocol
        _Counting.hits.append(self.path)
        self.send_response(200)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


# every kind of load a page can start from script, each at the local server
_ATTEMPTS = """(async () => {
    const seen = [];
    document.addEventListener('securitypolicyviolation', e => seen.push(e.violatedDirective));
    const url = '%s';
    const attempts = [
        fetch(url + 'fetch').catch(() => null),
        new Promise(r => { const x = new XMLHttpRequest(); x.onloadend = r; x.open('GET', url + 'xhr'); x.send(); }),
        new Promise(r => { const i = new Image(); i.onload = i.onerror = r; i.src = url + 'img'; }),
        new Promise(r => { const s = document.createElement('script'); s.onload = s.onerror = r;
                           s.src = url + 'script'; document.head.appendChild(s); }),
        new Promise(r => { const l = document.createElement('link'); l.rel = 'stylesheet'; l.onload = l.onerror = r;
                           l.href = url + 'style'; document.head.appendChild(l); }),
    ];
    const frame = document.createElement('iframe'); frame.src = url + 'frame'; document.body.appendChild(frame);
    navigator.sendBeacon(url + 'beacon', 'x');
    await Promise.all(attempts);
    await new Promise(r => setTimeout(r, 500));
    return seen;
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_chromium_runs_the_page_and_refuses_its_network_loads(results, tmp_path):
    """The page renders in headless Chromium with its scripts running under its own policy, and
    every load a script then tries (fetch, XHR, image, script, stylesheet, frame, beacon) is refused
    by the browser: a violation is reported for it and nothing reaches a server listening for it."""
    path = write_report(_with_theory(results), tmp_path / "report.html")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Counting.hits = []
    browser = Chromium(CHROMIUM)
    try:
        browser.open(f"file://{path}")
        deadline = time.monotonic() + 30
        while browser.evaluate("window.precisionReport ? window.precisionReport.chartsDrawn() : -1") < 1:
            assert time.monotonic() < deadline, "no chart was drawn: the page's scripts did not run"
            time.sleep(0.02)
        assert browser.problems() == []
        assert browser.evaluate("document.getElementById('script-error').hidden") is True
        violated = browser.evaluate(_ATTEMPTS % f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        browser.close()
        server.shutdown()
    assert _Counting.hits == [], f"requests reached the server: {_Counting.hits}"
    assert {"connect-src", "img-src", "script-src-elem", "style-src-elem", "frame-src"} <= set(violated), violated


# ---------------------------------------------------------------- probe cases

@pytest.fixture(scope="module")
def probe_results() -> Results:
    """An encoder whose fp16 scores overflow in emulated mode (not under autocast's fused attention),
    and a healthy MLP: two models, two modes each."""
    torch = pytest.importorskip("torch")
    from precision_suite.probe import probe

    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)) * 300
    a = probe(enc, x, formats=("fp16", "bf16"), modes=("emulated", "autocast"), model_name="encoder")
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    b = probe(mlp, torch.randn(8, 32, generator=torch.Generator().manual_seed(4)), formats="fp16",
              modes=("emulated", "autocast"), model_name="mlp")
    return Results(a.cases + b.cases, a.environments)


def test_probe_cases_read_as_models_with_a_row_per_mode_and_a_column_per_format(probe_results):
    """One heatmap per model and input shape (the emulated and autocast cases of a model have different
    op counts and used to land in separate heatmaps, labelled 'init input 2x16x64'), each failing cell
    naming its op, no theory lines and no 'across inits' charts (ops of different modes do not line up)."""
    dom = _dom(render_report(probe_results))
    groups = list(dom.find_all("section", cls="group"))
    titles = [next(g.find_all("h2")).all_text().replace("#", "").strip() for g in groups]
    assert titles == ["encoder · input 2x16x64", "mlp · input 8x32"]
    enc = groups[0]
    assert [th.all_text().strip() for th in next(enc.find_all("thead")).find_all("th")] == ["mode", "fp16", "bf16"]
    assert [next(tr.find_all("th")).all_text().strip() for tr in next(enc.find_all("tbody")).find_all("tr")] == \
        ["emulated", "autocast"]
    failing = [r for r in probe_results.cases if r.failure]
    assert [(r.case.format, r.case.mode) for r in failing] == [("fp16", "emulated")]
    r = failing[0]
    site = r.probe["event_sites"]["first_overflow"]
    assert site["name"] == "self_attn:bmm"
    assert _cell_lines(next(enc.find_all("td", data_id=r.id))) == [f"overflow @ {r.failure['layer']}",
                                                                    "at self_attn:bmm"]
    for g in groups:
        assert "theory" not in g.all_text() and "Across inits" not in g.all_text()
        assert not list(g.find_all("div", cls="chart"))
    summary = next(dom.find_all("section", id="summary")).all_text()
    assert f"fp16 emulated (overflow @ {r.failure['layer']} at self_attn:bmm)" in summary
    assert "mlp · input 8x32: all 2 format × mode cases survive" in " ".join(summary.split())
    axes = next(dom.find_all("dl", cls="axes")).all_text()
    assert "model" in axes and "encoder, mlp" in axes and "init" not in axes
    section = next(d for d in dom.find_all("details", cls="case") if d.attrs["data-id"] == r.id).all_text()
    lh = r.probe["least_headroom"]
    assert lh["bits"] == site["headroom_bits"]  # one figure: the event site's and the case's least headroom
    assert f"{lh['bits']:+.1f} bits at layer {site['layer']} (self_attn:bmm, forward)" in section
    assert "none left" not in section  # the rounded amax's reading of the same op is not shown beside it


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_a_probe_case_renders_in_headless_chromium_with_its_charts(probe_results, tmp_path):
    path = write_report(probe_results, tmp_path / "report.html")
    healthy = next(r for r in probe_results.cases if r.case.model == "mlp" and r.case.mode == "emulated")
    anchor = next(d.attrs["id"] for d in _dom(path.read_text()).find_all("details", cls="case")
                  if d.attrs["data-id"] == healthy.id)
    shot = render_in_chromium(path, fragment=f"#{anchor}", min_charts=4)
    assert shot["problems"] == [] and not shot["error_banner"]
    assert shot["open"] == [healthy.id]
    assert shot["charts"] >= 4 and shot["inked"] == shot["charts"]  # no empty chart on the page
