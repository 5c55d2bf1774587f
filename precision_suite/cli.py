"""Command line: ``precision-suite run | probe | report | compare | merge | list | schema | formats | env``.

Exit codes: 0 ok, 1 a check failed (``--fail-on``) or a case raised (every result is still
written), 2 usage or bad input, or every case skipped (reasons on stderr, nothing written), 130
interrupted (143: by SIGTERM; finished cases are kept in the JSON and its journal, and ``run
--resume`` finishes the run). ``--help`` imports no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .defaults import DEFAULTS, OUT, PROBE, THREADS, TOLERANCES
from .verdicts import FAIL_ON_CHOICES

__all__ = ["main", "build_parser", "FAIL_ON_CHOICES"]

_LIST_AXES = ("inits", "activations", "formats", "devices", "modes", "backends", "norms", "inputs",
              "depth", "width", "batch", "seed")


_DESCRIPTION = ("Numerical-precision stress tests: chains of layers in fp32, fp16, bf16 and fp8, with\n"
                "per-layer statistics, the layer where each chain overflows, underflows or dies, and an HTML report.")
_EPILOG = """exit codes:
  0    every case ran and no --fail-on check failed
  1    a --fail-on check failed, a case raised an error (all results are still written),
       or an event moved against --baseline (compare: against BASELINE)
  2    usage or bad input, or every case was skipped (nothing is written)
  130  interrupted by Ctrl-C, 143 by SIGTERM (finished cases are kept in the results JSON and
       its journal; `run ... --resume` runs only the rest)

definitions of every event and statistic: docs/definitions.md"""


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error here
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="precision-suite", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"precision-suite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a matrix of layer chains and write results.json (+ report.html)",
                         description="Run init x activation x format x device x mode chains; every axis is a "
                                     "comma list (commas inside parentheses do not split). A case that cannot run "
                                     "here (no GPU, no kernel for the format) is skipped with the reason. "
                                     "`precision-suite list` prints every axis's valid values.")
    axes = run.add_argument_group("matrix axes (comma lists)")
    for name, example in (("inits", "kaiming_normal,normal(std=2.0)"), ("activations", "relu,gelu"),
                          ("formats", "fp16,bf16,fp8_e4m3fn"), ("devices", "cpu,cuda"),
                          ("modes", "emulated,native"), ("backends", "torch,numpy"),
                          ("norms", "none,layernorm"), ("inputs", "normal,pixels,shifted(mean=1,std=0.1)"),
                          ("depth", "50,100"), ("width", "256"), ("batch", "64"), ("seed", "0,1")):
        axes.add_argument(f"--{name}", metavar="LIST", help=f"e.g. {example}")
    opts = run.add_argument_group("chain and run options")
    opts.add_argument("--residual", metavar="ALPHA", type=float, help="x_l = x_{l-1} + ALPHA * f(x_{l-1})")
    opts.add_argument("--bias", action="store_true", default=None, help="draw a zero-mean bias like the weights")
    opts.add_argument("--underflow-threshold", type=float, metavar="FRAC",
                      help=f"underflowed fraction that counts as the underflow event "
                           f"(default {DEFAULTS['underflow_threshold']:g})")
    opts.add_argument("--loss-scale", type=float, metavar="S", help="multiply the loss (and every gradient) by S")
    opts.add_argument("--rel-error", action="store_true", default=None,
                      help="also run an fp64 shadow chain and record the relative RMS error per layer")
    opts.add_argument("--no-backward", action="store_true", default=None, help="forward pass only")
    opts.add_argument("--fail-on", metavar="LIST",
                      help=f"exit 1 if any case has one of: {', '.join(FAIL_ON_CHOICES)} (grad_: the backward pass; "
                           "a case that raised exits 1 whatever this says)")
    opts.add_argument("--baseline", metavar="FILE", help="results JSON of an earlier run: compare right after this run "
                                                         "(as `precision-suite compare FILE`) and exit 1 on regression")
    opts.add_argument("--out", metavar="DIR", help=f"output directory (default: {OUT})")
    opts.add_argument("--json", metavar="PATH", help="results JSON path (default: OUT/results.json)")
    opts.add_argument("--html", metavar="PATH", help="HTML report path (default: OUT/report.html)")
    opts.add_argument("--config", metavar="FILE", help="TOML file of the same options "
                                                       "(also read: [tool.precision-suite] in ./pyproject.toml)")
    opts.add_argument("--threads", type=int, metavar="N",
                      help=f"torch threads (default: $OMP_NUM_THREADS, else {THREADS}: the matrix's tensors are small and "
                           "extra threads spin-wait badly on a busy machine; raise it for wide chains)")
    opts.add_argument("--jobs", "-j", type=int, metavar="N",
                      help="processes that run the matrix side by side, each with --threads threads (default: one "
                           "per core, as memory allows; 1: everything in this process)")
    opts.add_argument("--quiet", "-q", action="store_true", help="no progress, summary only")
    opts.add_argument("--resume", action="store_true", default=None,
                      help="finish an interrupted run: keep the cases its journal (JSON.journal beside the results) "
                           "holds and run only the rest; the arguments must be the interrupted run's")

    report = sub.add_parser("report", help="render the HTML report of a results file",
                            description="Render one self-contained HTML report (no network) from a results "
                                        "JSON; with --baseline, add a section listing the cases whose events moved "
                                        "and exit 1 when a judged event moved (as compare does).")
    report.add_argument("results", metavar="RESULTS.json")
    report.add_argument("-o", "--output", metavar="PATH", help="HTML path (default: report.html beside RESULTS.json)")
    report.add_argument("--baseline", metavar="OTHER.json", help="results of an earlier run to diff against")

    cmp = sub.add_parser("compare", help="diff two runs, or one run along an axis; exit 1 when an event moved",
                         description="Match cases by id (or, with --across, by every spec field but one axis) and "
                                     "exit 1 when a case's failure, first_overflow, first_nan, first_underflow or "
                                     "first_zero moved (forward or backward), a case went from ok to error, or a "
                                     "baseline case is missing. first_underflow_any and first_subnormal moves and "
                                     "drifted statistics are reported, not judged (unless --strict-stats).")
    cmp.add_argument("baseline", metavar="BASELINE.json")
    cmp.add_argument("current", metavar="CURRENT.json", nargs="?",
                     help="the run to check (omit it with --across to compare one file's cases with each other)")
    cmp.add_argument("--across", metavar="AXIS[=BASE:CUR]",
                     help="match cases that differ only in AXIS (device, mode, backend, format), e.g. "
                          "--across mode=emulated:native; without values the first in sorted order is the baseline")
    cmp.add_argument("--layers", type=int, default=TOLERANCES["layers"], metavar="N",
                     help="layers an event may move (default %(default)s)")
    cmp.add_argument("--bits", type=float, default=TOLERANCES["bits"], metavar="B",
                     help="drift of log2 rms/amax reported beyond this (default %(default)s)")
    cmp.add_argument("--fraction", type=float, default=TOLERANCES["fraction"], metavar="F",
                     help="drift of a fraction statistic reported beyond this (default %(default)s; 0.01 is one "
                          "percentage point)")
    cmp.add_argument("--strict-stats", action="store_true", help="judge drifted statistics too (exit 1)")
    cmp.add_argument("--json", metavar="PATH", help="also write the diff as JSON (- prints it instead of the table)")
    cmp.add_argument("--html", metavar="PATH", help="also write CURRENT's report with the diff section")

    merge = sub.add_parser("merge", help="merge result shards (e.g. from several CI machines) into one file")
    merge.add_argument("inputs", nargs="+", metavar="RESULTS.json")
    merge.add_argument("-o", "--output", required=True, metavar="PATH")
    merge.add_argument("--allow-mixed", action="store_true",
                       help="keep the later shard's result where two shards ran the same case differently")

    prb = sub.add_parser("probe", help="probe your own nn.Module: per-op overflow/underflow, forward and backward",
                         description="Run a model's forward and backward pass in each format and mode, op by op, "
                                     "and write results.json and report.html (docs/probe.md). FACTORY is "
                                     "package.module:function returning (model, example_inputs) or a model.")
    prb.add_argument("factory", metavar="FACTORY")
    src = prb.add_mutually_exclusive_group()
    src.add_argument("--input-shape", metavar="SHAPE", help="a normal input of this shape, e.g. 8,128,512")
    src.add_argument("--inputs", metavar="FILE.pt", help="example inputs saved with torch.save")
    prb.add_argument("--formats", metavar="LIST", default=",".join(PROBE["formats"]),
                     help="e.g. fp16,bf16,fp8_e4m3fn (default %(default)s)")
    prb.add_argument("--modes", metavar="LIST", default=",".join(PROBE["modes"]),
                     help="emulated,autocast,native (default %(default)s)")
    prb.add_argument("--device", default=PROBE["device"], help="cpu, cuda, cuda:N, mps (default %(default)s)")
    prb.add_argument("--seed", type=int, default=DEFAULTS["seed"][0],
                     help="seed of the drawn input and the backward seed gradient (default %(default)s)")
    prb.add_argument("--underflow-threshold", type=float, default=DEFAULTS["underflow_threshold"], metavar="FRAC",
                     help="underflowed fraction that counts as the underflow event (default %(default)s)")
    prb.add_argument("--loss-scale", type=float, default=DEFAULTS["loss_scale"], metavar="S",
                     help="multiply the loss (and every gradient) by S (default %(default)s)")
    prb.add_argument("--no-backward", action="store_true", help="forward pass only")
    prb.add_argument("--out", metavar="DIR", default=OUT, help="output directory (default: %(default)s)")
    prb.add_argument("--json", metavar="PATH", help="results JSON path (default: OUT/results.json)")
    prb.add_argument("--html", metavar="PATH", help="HTML report path (default: OUT/report.html)")

    sub.add_parser("list", help="print every axis's valid values and its default (what run's comma lists take)")
    sub.add_parser("schema", help="print the JSON Schema of the results files (what compare, merge and report accept)")
    sub.add_parser("formats", help="print each format's limits from finfo")
    sub.add_parser("env", help="print this machine's environment fingerprint")
    return parser


# ---------------------------------------------------------------- config

def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _merged_options(args: argparse.Namespace) -> dict:
    """``run``'s options: command line beats config file (``config``) beats defaults."""
    from .config import ConfigError, merged_options, run_options

    try:
        return merged_options(args, run_options(_subcommand("run")._actions))
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _parse_fail_on(value) -> list[str]:
    from .spec import split_list

    items = split_list(value) if isinstance(value, str) else list(value)
    for item in items:
        if item not in FAIL_ON_CHOICES:
            raise UsageError(f"--fail-on: unknown event {item!r}; valid: {', '.join(FAIL_ON_CHOICES)}")
    return items


# ---------------------------------------------------------------- commands

def _spare_workers(jobs) -> int:
    """Workers to spawn before this process imports torch (``workers.prestarted``): one, where the
    run may use several processes, so that it starts up beside this one (spawned when the units are
    ready, it began ~1.5 s after this process began computing); the rest as the run decides."""
    from .workers import usable_cores

    return int((jobs is None or (isinstance(jobs, int) and jobs > 1)) and usable_cores() > 1)


def _cmd_run(args) -> int:
    from .workers import prestarted

    options = _merged_options(args)
    with prestarted(_spare_workers(options.get("jobs"))):
        return _run(options, args)


def _run(options: dict, args) -> int:
    from .environment import check_parallel
    from .spec import Matrix, SpecError

    out = Path(options.get("out", OUT))
    json_path = Path(options.get("json") or out / "results.json")
    html_path = Path(options.get("html") or out / "report.html")
    _check_outputs(("--json", json_path), ("--html", html_path))
    fail_on = _parse_fail_on(options.get("fail_on", []))
    for key in ("threads", "jobs"):
        if options.get(key) is not None and (why := check_parallel(f"--{key}", options[key])):
            raise UsageError(why)
    matrix_keys = set(_LIST_AXES) | {"residual", "bias", "underflow_threshold", "loss_scale"}
    try:
        matrix = Matrix.from_options(**{k: v for k, v in options.items() if k in matrix_keys})
        from .runner import check_memory

        cases = matrix.cases()
        backward = not options.get("no_backward", False)
        check_memory(cases, backward)
    except SpecError as e:
        raise UsageError(str(e)) from None
    _refuse_all_skipped(cases)
    baseline = None if options.get("baseline") is None else _load_for_report(str(options["baseline"]))

    from .journal import JournalError, journal_path
    from .progress import Progress
    from .runner import RunInterrupted, run_matrix
    from .summary import summary_table
    from .verdicts import failed_checks

    import signal

    class _Terminated(KeyboardInterrupt):
        """SIGTERM (CI timeouts, cancellations) takes the Ctrl-C path: finished cases kept, exit 128+15."""

    def _on_term(signum, frame):
        raise _Terminated()

    resume = bool(options.get("resume"))
    journal = journal_path(json_path)
    if resume and not journal.exists():
        print(f"--resume: no interrupted run at {journal}; running every case", file=sys.stderr)
    elif not resume and journal.exists():
        print(f"starting over: {journal} of an interrupted run is replaced (--resume would finish that run)",
              file=sys.stderr)
    results = None
    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        with Progress(len(cases), enabled=not options.get("quiet", False)) as progress:
            try:
                results = run_matrix(cases=cases, backward=backward, rel_error=bool(options.get("rel_error")),
                                     json_path=json_path, resume=resume, on_result=progress.update,
                                     on_restored=progress.restore, threads=options.get("threads"),
                                     jobs=options.get("jobs"))
            except JournalError as e:
                raise UsageError(str(e)) from None
        print(summary_table(results))
        print(f"results: {json_path}")
        report = _write_report(results, html_path)
        if report:
            print(f"report:  {report}")
        errors = [r for r in results.cases if r.status == "error"]
        for r in errors:  # always reported (and exit 1), so `--fail-on error` adds nothing here
            print(f"ERROR {r.id}: {r.error}", file=sys.stderr)
        failed = failed_checks(results, [item for item in fail_on if item != "error"])
        for line in failed:
            print(f"FAIL {line}", file=sys.stderr)
        regressed = baseline is not None and _print_comparison(baseline, results, argparse.Namespace(
            across=None, strict_stats=False, json=None, **TOLERANCES)) == 1
        return 1 if errors or failed or regressed else 0
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e.__cause__ or e, _Terminated) else 130
        if isinstance(e, RunInterrupted):
            _report_interrupt(e, len(cases), json_path, html_path, _resume_command(args))
        elif results is None:  # a second interrupt while the first one's cases were being saved
            print(f"\ninterrupted: finished cases are in {journal}; resume with:\n  {_resume_command(args)}",
                  file=sys.stderr)
        else:
            print(f"\ninterrupted after the run: the results are complete in {json_path}; "
                  f"`precision-suite report {json_path}` renders the report", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_interrupt(interrupt, total: int, json_path: Path, html_path: Path, resume_command: str) -> None:
    """What an interrupted run saved, the report of its finished cases, and how to finish it."""
    ran = sum(r.status != "skipped" for r in interrupt.results.cases)
    print(f"\ninterrupted: {ran} of {total} cases finished, saved in {json_path} and its journal "
          f"{interrupt.journal}", file=sys.stderr)
    if interrupt.results.cases:
        try:
            report = _write_report(interrupt.results, html_path)
        except KeyboardInterrupt:  # interrupted again: the JSON and journal are already safe
            report = None
        if report:
            print(f"report of the finished cases: {report}", file=sys.stderr)
    print(f"resume with:\n  {resume_command}", file=sys.stderr)


def _resume_command(args) -> str:
    """The command line of this run (as parsed: every option given, none from a config file) + --resume."""
    import shlex

    words = ["precision-suite", "run"]
    for action in _subcommand("run")._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in ("help", "resume") or value in (None, False):
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))
        words += [flag] if action.nargs == 0 else [flag, str(value)]
    return shlex.join([*words, "--resume"])


def _print_comparison(baseline, current, args) -> int:
    """Compare, print the table (or JSON), return the exit code; bad input is a UsageError."""
    import json

    from .compare import CompareError, Tolerances, compare, parse_across, render_text, to_json

    try:
        axis, values = parse_across(args.across) if args.across else (None, None)
        if args.layers < 0 or not args.bits > 0 or not 0 < args.fraction <= 1:
            raise CompareError(f"--layers must be >= 0, --bits > 0 and --fraction in (0, 1]; got {args.layers}, "
                               f"{args.bits}, {args.fraction}")
        result = compare(baseline, current, tolerances=Tolerances(args.layers, args.bits, args.fraction),
                         across=axis, values=values, strict_stats=args.strict_stats)
    except CompareError as e:
        raise UsageError(str(e)) from None
    if args.json == "-":
        print(json.dumps(to_json(result), indent=1, allow_nan=False))
    else:
        print(render_text(result))
        if args.json:
            from .results import write_json_atomic

            print(f"diff: {write_json_atomic(args.json, to_json(result))}")
    return result.exit_code


def _check_outputs(*outputs: tuple[str, object]) -> None:
    """Refuse, before any work, an output path that cannot be written: ``(flag, path)`` pairs."""
    from .results import unwritable

    for flag, path in outputs:
        why = None if path is None or path == "-" else unwritable(path)
        if why:
            raise UsageError(f"{flag} {path}: {why}")


def _refuse_all_skipped(cases) -> None:
    """A run with nothing to run is bad input: say why, one line per distinct reason, before anything is written."""
    from collections import Counter

    from .engine.support import skip_reason

    reasons = Counter()
    for case in cases:
        reason = skip_reason(case)
        if reason is None:
            return
        reasons[reason] += 1
    lines = [f"  {n} case{'s' * (n > 1)}: {reason}" for reason, n in reasons.items()]
    raise UsageError("\n".join([f"every case is skipped here, nothing was run or written ({len(cases)} cases):",
                                 *lines]))


def _write_report(results, html_path: Path):
    try:
        from .report import write_report
    except ImportError:
        return None
    return write_report(results, html_path)


def _load_for_report(path: str):
    from .results import ResultsError, load_results

    try:
        return load_results(path)
    except ResultsError as e:
        raise UsageError(str(e)) from None


def _cmd_report(args) -> int:
    from .report import write_report

    results = _load_for_report(args.results)
    baseline = None if args.baseline is None else _load_for_report(args.baseline)
    output = Path(args.output) if args.output else Path(args.results).parent / "report.html"
    _check_outputs(("--output", output))
    try:
        path = write_report(results, output, baseline=baseline)
    except OSError as e:
        raise UsageError(f"cannot write {output}: {e.strerror or e}") from None
    print(f"report: {path}")
    if baseline is None:
        return 0
    from .compare import CompareError, compare

    try:
        regressions = compare(baseline, results).regressions
    except CompareError as e:  # the report still shows what is only in one run
        print(f"baseline: {e}")
        return 0
    print(f"baseline: {len(regressions)} judged events moved" + (" (precision-suite compare lists them)"
                                                                   if regressions else ""))
    return 1 if regressions else 0


def _cmd_compare(args) -> int:
    if args.current is None and not args.across:
        raise UsageError("compare needs BASELINE.json and CURRENT.json, or one file and --across AXIS")
    baseline = _load_for_report(args.baseline)
    current = baseline if args.current is None else _load_for_report(args.current)
    if args.html and args.across:
        raise UsageError("--html shows a baseline diff of CURRENT's report; it does not take --across")
    _check_outputs(("--json", args.json), ("--html", args.html))
    code = _print_comparison(baseline, current, args)
    if args.html:
        from .report import write_report

        print(f"report: {write_report(current, Path(args.html), baseline=baseline)}")
    return code


def _cmd_merge(args) -> int:
    from .results import ResultsError, load_results, merge_results, write_json_atomic

    _check_outputs(("--output", args.output))
    try:
        parts = [load_results(p) for p in args.inputs]
    except ResultsError as e:
        raise UsageError(str(e)) from None
    try:
        merged = merge_results(parts, allow_mixed=args.allow_mixed)
    except ResultsError as e:
        raise UsageError(str(e)) from None
    write_json_atomic(args.output, merged.to_dict())
    print(f"merged {sum(len(p.cases) for p in parts)} cases from {len(parts)} files into {len(merged.cases)}: {args.output}")
    return 0


def _cmd_formats(args) -> int:
    from .formats import FORMATS

    head = (f"{'format':<11} {'max':>12} {'overflow at':>12} {'smallest normal':>16} {'smallest subnormal':>19} "
            f"{'eps':>10}  on overflow")
    print(head)
    for f in FORMATS.values():
        print(f"{f.name:<11} {f.max:>12.6g} {f.overflow_threshold:>12.6g} {f.smallest_normal:>16.6g} "
              f"{f.smallest_subnormal:>19.6g} {f.eps:>10.4g}  {f.overflow_behaviour}")
    return 0


def _cmd_list(args) -> int:
    """Every axis of ``run``: its valid values (from the registries) and its default here."""
    from .spec import axis_choices, default_devices, default_modes

    devices = default_devices()
    modes = {mode: [d for d in devices if mode in default_modes([d])] for d in devices for mode in default_modes([d])}
    defaults = {**DEFAULTS, "devices": devices,
                "modes": [m if len(on) == len(devices) else f"{m} (on {', '.join(on)})" for m, on in modes.items()]}
    print("run's axes (comma lists; commas inside parentheses do not split), their valid values and defaults:")
    for axis, lines in axis_choices().items():
        print(f"\n--{axis}")
        for line in [*lines, f"default: {', '.join(map(str, defaults[axis]))}"]:
            print(f"    {line}")
    print(f"\n--fail-on\n    {', '.join(FAIL_ON_CHOICES)}\n    default: none")
    return 0


def _cmd_schema(args) -> int:
    import json

    from .validation import results_schema

    print(json.dumps(results_schema(), indent=2))
    return 0


def _cmd_env(args) -> int:
    import json

    from .environment import fingerprint

    print(json.dumps(fingerprint(), indent=2))
    return 0


def _cmd_probe(args) -> int:
    """Bad input (factory, shapes, options) is a ProbeError -> one line, exit 2, nothing written."""
    from .probe.factory import probe_command
    from .spec import SpecError

    out = Path(args.out)
    json_path = Path(args.json) if args.json else out / "results.json"
    html_path = Path(args.html) if args.html else out / "report.html"
    _check_outputs(("--json", json_path), ("--html", html_path))
    try:
        results = probe_command(args)
    except SpecError as e:
        raise UsageError(str(e)) from None
    from .results import write_json_atomic

    print(f"results: {write_json_atomic(json_path, results.to_dict())}")
    html = _write_report(results, html_path)
    if html is not None:
        print(f"report: {html}")
    return 1 if any(c.status == "error" for c in results.cases) else 0


_COMMANDS = {"run": _cmd_run, "probe": _cmd_probe, "report": _cmd_report, "compare": _cmd_compare, "merge": _cmd_merge,
             "list": _cmd_list, "schema": _cmd_schema, "formats": _cmd_formats, "env": _cmd_env}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except UsageError as e:
        print(f"precision-suite: error: {e}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``precision-suite`` command: ``main()``, then exit without tearing the interpreter down.
    Unloading torch and scipy takes ~0.5 s after every command and frees nothing the OS would not;
    by then every file is closed and every worker joined, so only the output streams need flushing."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
