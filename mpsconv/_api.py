"""Signatures for initializers that take Swift's overloads as keyword sets (a leaf).

``MPSCNNConvolution(device=, weights=)`` and ``MPSCNNConvolution(coder=, device=)`` are one Python
constructor that picks the overload from the keywords it is given; its code takes ``**kwargs``.
``keywords`` gives such a constructor the signature ``help()`` and ``inspect.signature`` show: every
keyword of every overload, keyword-only, with a marker default (a keyword may be left out, but only
as an overload allows: the docstring lists them, and a wrong combination is refused naming them).
"""
from __future__ import annotations

import inspect


class _Overload:
    """The default ``help()`` shows for a keyword that some overloads take and others do not."""

    def __repr__(self) -> str:
        return "<per overload>"


OVERLOAD = _Overload()


def keywords(*names: str):
    """Class decorator: ``__init__`` shows ``(self, *, name=<per overload>, ...)``."""
    def apply(cls):
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=OVERLOAD) for name in names]
        init = cls.__dict__["__init__"]
        init.__signature__ = inspect.Signature(params)
        return cls
    return apply
