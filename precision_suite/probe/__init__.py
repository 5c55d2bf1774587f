"""Probe a user's own ``nn.Module``: per-op and per-module overflow/underflow, forward and
backward, emulated and under autocast (docs/probe.md).

Modules, one responsibility each: ``case`` (the spec, torch-free), ``ops`` (which aten ops are
layers), ``tracker`` (which module runs), ``observer`` (the TorchDispatchMode), ``record``
(statistics, events and their sites), ``run`` (``probe`` and ``watch``), ``factory`` (the
CLI's ``package.module:factory`` and its inputs), ``chain`` (``run --modes autocast``).
Names load on first use: importing this package costs no torch import.
"""

from importlib import import_module as _import_module

_EXPORTS = {"probe": "run", "watch": "run", "Watch": "run", "ProbeCase": "case", "ProbeError": "case"}

__all__ = ["probe", "watch", "Watch", "ProbeCase", "ProbeError"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'precision_suite.probe' has no attribute {name!r}")
    value = getattr(_import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _ProbePackage(_types.ModuleType):
    """``precision_suite.probe`` is both this package and the function: importing a submodule
    binds the package to ``precision_suite.probe``, and ``precision_suite.probe(model, inputs)``
    must still probe."""

    def __call__(self, *args, **kwargs):
        return __getattr__("probe")(*args, **kwargs)


_sys.modules[__name__].__class__ = _ProbePackage
