"""precision-suite: where do layer chains overflow or underflow in fp16, bf16 and fp8?

Public API: ``run_matrix`` / ``run_case`` run chains, ``Case`` / ``Matrix`` describe them,
``load_results`` / ``Results`` read the JSON contract back.

The names load on first use (PEP 562 ``__getattr__``): ``import precision_suite`` — and the
pytest plugin, which every pytest run in an environment that has the package imports — costs no
numpy, ml_dtypes or torch import until one of them is touched.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "FORMATS": "formats", "Format": "formats", "get_format": "formats",
    "CaseResult": "results", "Results": "results", "load_results": "results", "merge_results": "results",
    "run_case": "runner", "run_matrix": "runner",
    "Case": "spec", "Matrix": "spec", "SpecError": "spec",
    "probe": "probe.run", "watch": "probe.run", "ProbeError": "probe.case",
}

__all__ = ["__version__", "run_matrix", "run_case", "Case", "Matrix", "SpecError", "Results", "CaseResult",
           "load_results", "merge_results", "Format", "FORMATS", "get_format", "probe", "watch", "ProbeError"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'precision_suite' has no attribute {name!r}")
    value = getattr(_import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
