"""Case status end to end: skipped (known before running) is printed and never fails; error (anything
unexpected) is only the case that raised, and makes the run exit 1 and the pytest test fail."""

import dataclasses
import json

import pytest

from precision_suite import activations, run_matrix
from precision_suite.cli import main

torch = pytest.importorskip("torch")

pytest_plugins = ["pytester"]

SMALL = ["--inits", "normal", "--formats", "fp16", "--depth", "4", "--width", "8", "--batch", "2", "--jobs", "1"]
BOOM = "RuntimeError: tanh kernel exploded on purpose"


def _boom(x):
    raise RuntimeError("tanh kernel exploded on purpose\nsecond line that the error must not carry")


@pytest.fixture
def raising_tanh(monkeypatch):
    """tanh raises inside the engine, in the stack it shares with relu and gelu (emulated cases
    that differ only in their activation run as one stacked chain)."""
    monkeypatch.setitem(activations.ACTIVATIONS, "tanh", dataclasses.replace(activations.ACTIVATIONS["tanh"],
                                                                              torch_fn=_boom))


def _cases(path) -> dict:
    return {c["id"]: c for c in json.loads(path.read_text())["cases"]}


def _numbers(case: dict) -> dict:
    return {k: v for k, v in case.items() if k != "seconds"}


def test_only_the_raising_case_of_a_stack_is_an_error(tmp_path, capsys, raising_tanh):
    from precision_suite.engine import split_units
    from precision_suite.spec import Matrix

    matrix = Matrix.from_options(inits="normal", activations="relu,tanh,gelu", formats="fp16")
    assert len(split_units(matrix.cases())) == 1  # the three cases are one stacked unit

    code = main(["run", *SMALL, "--activations", "relu,tanh,gelu", "--out", str(tmp_path / "with")])
    err = capsys.readouterr().err
    assert code == 1
    got = _cases(tmp_path / "with" / "results.json")
    assert (tmp_path / "with" / "report.html").exists()
    tanh_id = "tanh-normal-fp16-cpu-emulated-torch-w8-d4-b2-s0"
    assert got[tanh_id]["status"] == "error" and got[tanh_id]["error"] == BOOM
    assert f"ERROR {tanh_id}: {BOOM}" in err.splitlines()

    assert main(["run", *SMALL, "--activations", "relu,gelu", "--out", str(tmp_path / "without")]) == 0
    alone = _cases(tmp_path / "without" / "results.json")
    assert set(got) - {tanh_id} == set(alone)
    for case_id, case in alone.items():
        assert got[case_id]["status"] == "ok"
        assert _numbers(got[case_id]) == _numbers(case), case_id


def test_fail_on_error_is_accepted_and_reports_each_error_once(tmp_path, capsys, raising_tanh):
    assert main(["run", *SMALL, "--activations", "relu", "--fail-on", "error", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["run", *SMALL, "--activations", "tanh", "--fail-on", "error,overflow",
                 "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count(BOOM) == 1, err


def test_native_fp8_relu_is_skipped_naming_the_op_and_the_dtype():
    results = run_matrix(inits="normal", activations="relu,identity", formats="fp8_e4m3fn", modes="native",
                         devices="cpu", depth=[3], width=[8], batch=[2])
    relu, identity = results.cases
    assert relu.status == "skipped" and relu.error is None
    assert "relu" in relu.skip_reason and "float8_e4m3fn" in relu.skip_reason
    assert "NotImplementedError" not in relu.skip_reason  # a known limit, not an exception's report
    assert identity.status == "ok"  # fp8 F.linear runs on CPU: only the cases that need more skip


def test_all_skipped_run_exits_2_writes_nothing_and_gives_each_reason(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", *SMALL, "--formats", "fp8_e4m3fn", "--modes", "native", "--activations", "relu,gelu,tanh",
                 "--inits", "normal,kaiming_normal", "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert not out.exists()
    assert len(err) == 1 + 3 and all("Traceback" not in line for line in err)  # one line per distinct reason
    for act, line in zip(("relu", "gelu", "tanh"), err[1:]):
        assert line.strip().startswith("2 cases: no cpu kernel for " + act) and "float8_e4m3fn" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda cases run here")
def test_cuda_cases_without_a_gpu_are_skipped_not_an_error(tmp_path, capsys):
    assert main(["run", *SMALL, "--activations", "relu", "--devices", "cpu,cuda", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    cases = _cases(tmp_path / "results.json")
    cuda = [c for c in cases.values() if c["spec"]["device"] == "cuda"]
    assert cuda and all(c["status"] == "skipped" and c["error"] is None for c in cuda)
    assert {c["skip_reason"] for c in cuda} == {"no CUDA device: torch.cuda.is_available() is False"}
    assert "SKIPPED" in out and "no CUDA device" in out
    assert main(["run", *SMALL, "--devices", "cuda", "--out", str(tmp_path / "cuda")]) == 2
    assert not (tmp_path / "cuda").exists()


def test_malformed_device_is_still_a_usage_error(tmp_path, capsys):
    assert main(["run", *SMALL, "--devices", "cuda:x", "--out", str(tmp_path)]) == 2
    assert "unknown device 'cuda:x'" in capsys.readouterr().err


def test_an_errored_case_fails_its_pytest_test(pytester):
    from precision_suite.report import render_report  # numpy's C extensions cannot load twice (see test_plugin)

    render_report(run_matrix(inits="normal", activations="relu", formats="fp16", depth=[2], width=[4], batch=[2]))
    pytester.makepyfile(test_raising="""
        import dataclasses

        from precision_suite import activations

        def _boom(x):
            raise RuntimeError("tanh kernel exploded on purpose")

        def test_chain(precision_case, monkeypatch):
            tanh = dataclasses.replace(activations.ACTIVATIONS["tanh"], torch_fn=_boom)
            monkeypatch.setitem(activations.ACTIVATIONS, "tanh", tanh)
            precision_case(init="normal", activation="tanh", format="fp16", depth=3, width=8, batch=2)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*tanh-normal-fp16-cpu*could not run: {BOOM}*"])


def test_scaled_formats_run_quantized_on_both_backends():
    """Both engines quantize the matmul inputs: their results carry the quantized inputs' statistics
    (a chain that ran unquantized would have none)."""
    from precision_suite import run_matrix
    from precision_suite.scaled import SCALED_NAMES

    for name in SCALED_NAMES:
        torch_case, numpy_case = run_matrix(inits="normal", activations="relu", formats=name, devices="cpu",
                                            backends="torch,numpy", depth=2, width=128, batch=4).cases
        for r in (torch_case, numpy_case):
            assert r.status == "ok" and r.forward.gemm_in is not None and r.backward.grad_gemm_in is not None, name
