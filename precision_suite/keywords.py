"""Unknown keywords on the public API: ``run_matrix(depht=5)`` is a TypeError naming the valid ones.

``@strict_keywords`` on a function, or on a class (it checks ``__init__``), compares a call's
keywords with the parameters the callable takes before anything runs. Python's own message
("got an unexpected keyword argument") names no valid choice, and a ``**kwargs`` catch-all takes
any word silently: such a callable says where its extra keywords go (``forwards_to=Matrix``), and
their parameters are valid too. Imports nothing heavy.
"""

from __future__ import annotations

import difflib
import functools
import inspect

__all__ = ["strict_keywords", "unknown_keyword"]

_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def unknown_keyword(where: str, word: str, valid) -> TypeError:
    """``where() got an unknown keyword 'depht' (did you mean 'depth'?); valid: inits, ..., depth, ...``"""
    valid = list(valid)
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TypeError(f"{where}() got an unknown keyword {word!r}{hint}; valid: {', '.join(valid)}")


def _keywords(target) -> tuple[list[str], bool]:
    """(the names ``target`` takes by keyword, in order; whether it also has a ``**kwargs``)."""
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.kind in _BY_KEYWORD], any(p.kind is p.VAR_KEYWORD for p in params)


def strict_keywords(target=None, *, forwards_to=None):
    """Decorate ``target`` (a function, or a class) so that a keyword it does not take raises
    ``unknown_keyword``. ``forwards_to``: the callable a ``**kwargs`` passes its keywords to."""
    if target is None:
        return functools.partial(strict_keywords, forwards_to=forwards_to)
    valid, catch_all = _keywords(target)
    if forwards_to is not None:
        valid += [name for name in _keywords(forwards_to)[0] if name not in valid]
    elif catch_all:
        raise TypeError(f"strict_keywords: {target.__name__} takes **kwargs; say where they go (forwards_to=)")
    allowed = frozenset(valid)
    where = target.__name__
    inner = target.__init__ if isinstance(target, type) else target

    @functools.wraps(inner)
    def checked(*args, **kwargs):
        __tracebackhide__ = True  # pytest shows the caller's line, not this check
        if not allowed.issuperset(kwargs):
            raise unknown_keyword(where, next(k for k in kwargs if k not in allowed), valid)
        return inner(*args, **kwargs)

    if isinstance(target, type):
        target.__init__ = checked
        return target
    return checked
