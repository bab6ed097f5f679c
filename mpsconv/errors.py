"""Typed errors. Every message names the owner, the property, the value and what is allowed."""


class MPSConvError(Exception):
    """Base class of every error mpsconv raises on purpose."""


class MPSValueError(MPSConvError, ValueError):
    """A value is outside what the property or argument allows."""


class MPSTypeError(MPSConvError, TypeError):
    """An argument has the wrong type, or an initializer got an invalid keyword combination."""


class MPSCommandBufferError(MPSConvError, RuntimeError):
    """Misuse of a command buffer, a temporary image or state (encode after commit, ...)."""


class MPSArchiveError(MPSValueError):
    """A secure archive is truncated, tampered with, of another class, or cannot be written."""


class MPSDeviceError(MPSValueError):
    """An object of one device was used with another, or a device is not usable."""


class MPSMemoryError(MPSConvError, MemoryError):
    """An image or an encode's scratch memory would not fit (``MPSCONV_MEMORY_LIMIT`` on the CPU, the
    GPU's free memory on CUDA), or the allocator ran out while a command buffer ran."""
