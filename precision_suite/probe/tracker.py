"""Which module is running: a stack of fully qualified names (``encoder.layers.0.self_attn``).

``torch.utils.module_tracker.ModuleTracker`` keeps an unordered set of class-prefixed names; a
layer needs the innermost module, named as in ``model.state_dict()``, so this keeps a stack fed by
forward pre/post hooks on the probed model's own modules (nothing global). Backward ops are not
attributed here: their statistics are keyed to the forward layer whose output they are the
gradient of.
"""

from __future__ import annotations

__all__ = ["ModuleStack", "ROOT", "OUTSIDE", "INPUT", "PARAM", "BUFFER"]

ROOT = "(root)"  # ops in the top module's own forward
OUTSIDE = "(outside)"  # ops outside the model: the user's loss, for instance
INPUT = "(input)"  # the model's inputs, rounded to the format on entry (emulated, native)
PARAM = "(param)"  # a parameter past the format's range, a layer where it is first consumed
BUFFER = "(buffer)"  # a floating buffer (batch norm's running_var) past the range, likewise


class ModuleStack:
    """``with ModuleStack(model) as stack: ... stack.current`` is the innermost running module's fqn."""

    def __init__(self, model):
        self.model = model
        self.stack: list[str] = []
        self._handles: list = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else OUTSIDE

    def __enter__(self) -> "ModuleStack":
        for name, module in self.model.named_modules():
            label = name or ROOT
            self._handles.append(module.register_forward_pre_hook(self._enter(label)))
            self._handles.append(module.register_forward_hook(self._leave(label), always_call=True))
        return self

    def _enter(self, label: str):
        def hook(module, args):
            self.stack.append(label)
        return hook

    def _leave(self, label: str):
        def hook(module, args, output):
            if self.stack and self.stack[-1] == label:
                self.stack.pop()
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.stack.clear()
