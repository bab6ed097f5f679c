"""Signatures for initializers that take Swift's overloads as keyword sets (a leaf).

``MPSCNNConvolution(device=, weights=)`` and ``MPSCNNConvolution(coder=, device=)`` are one Python
constructor that picks the overload from the keywords it is given; its code takes ``**kwargs``.
``keywords`` gives such a constructor the signature ``help()`` and ``inspect.signature`` show: every
keyword of every overload, keyword-only, with a marker default (a keyword may be left out, but only
as an overload allows: the docstring lists them, and a wrong combination is refused naming them).
"""
from __future__ import annotations

import difflib
import inspect

from .errors import MPSTypeError


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
        init = cls.__dict__.get("__init__")
        if init is None:  # inherited: a function of this class's own carries its signature
            inherited = cls.__init__

            def init(self, **kwargs):
                inherited(self, **kwargs)

            init.__doc__, cls.__init__ = inherited.__doc__, init
        init.__signature__ = inspect.Signature(params)
        return cls
    return apply


class Strict:
    """Refuses an attribute its class does not have, as Swift refuses to compile one: ``desc.strideInPixelX = 2``
    raises an ``AttributeError`` that suggests ``strideInPixelsX`` instead of making a new attribute
    that nothing reads. Our own fields start with ``_``; subclasses written outside mpsconv (a data
    source, a padding policy, a custom kernel) keep Python's freedom."""

    __slots__ = ()
    _strict = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # the library's own classes; the tools on top (the demo's data source) are written as users write
        cls._strict = cls.__module__.startswith("mpsconv.") and cls.__module__ not in _USER_CODE

    def __setattr__(self, name: str, value, _set=object.__setattr__) -> None:
        if name[0] != "_" and self._strict and not hasattr(type(self), name) and name not in self.__dict__:
            raise AttributeError(misspelled(self, name))
        _set(self, name, value)


class LibraryMade:
    """Objects only the library makes (Metal's protocol objects: a device, a queue, a buffer...):
    ``Class()`` is refused, saying where they come from (``_made_by``); the library makes them with
    ``Class._make(...)``, which runs ``_init``."""

    __slots__ = ()
    _made_by = "the library makes them"

    def __init__(self, *args, **kwargs):
        raise MPSTypeError(f"{type(self).__name__}() is unavailable: {self._made_by}")

    @classmethod
    def _make(cls, *args):
        self = object.__new__(cls)
        self._init(*args)
        return self


class Uncopyable:
    """Objects that stand for work and its order (a queue, a command buffer, what lives inside one):
    Metal has no copy of them, and a copy would split one queue's order in two. ``copy``, ``deepcopy``
    and pickle are refused at once, saying what to do instead (``_copy_instead``), unless
    ``_copyable()`` says this one may be copied."""

    __slots__ = ()
    _copy_instead = "make a new one"

    def _copyable(self) -> bool:
        return False

    def __reduce_ex__(self, protocol):
        if self._copyable():
            return super().__reduce_ex__(protocol)
        raise MPSTypeError(f"{type(self).__name__} cannot be copied or pickled; {self._copy_instead}")


def decode_with(coder, obj, device=None, *, with_device: bool = True) -> None:
    """``init?(coder:[device:])``: ``coder`` (an ``NSKeyedUnarchiver``, or any object with
    ``decodeInto``) fills ``obj``."""
    decode = getattr(coder, "decodeInto", None)
    if not callable(decode):
        raise MPSTypeError(f"{type(obj).__name__}: coder={coder!r} must be an NSCoder (an NSKeyedUnarchiver)")
    if with_device:
        decode(obj, device)
    else:
        decode(obj)


_USER_CODE = {"mpsconv.demo", "mpsconv.bench", "mpsconv.networks", "mpsconv.verify"}


def misspelled(obj, name: str) -> str:
    """The message for an attribute ``obj``'s class does not have, with the nearest real names."""
    owner = type(obj).__name__
    known = sorted({n for n in dir(type(obj)) if not n.startswith("_")} | {n for n in vars(obj) if not n.startswith("_")})
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6) or \
        difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
    near = [next((k for k in known if k.lower() == n), n) for n in near]
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return f"{owner} has no attribute {name!r} to set{hint}"
