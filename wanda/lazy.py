"""Imports deferred to first use, so that importing the library costs no torch.

``import torch`` takes seconds (2.5-3 s on a quiet 2-core machine, more under load), and every
process that only reads parameters, decides to skip, or prints ``--help`` used to pay it. Two
tools keep such processes torch-free without changing what any name means:

- :func:`lazy_exports`: a package ``__init__`` re-exports its modules' names through a module
  ``__getattr__`` (PEP 562); a name's module is imported the first time it is asked for. The
  package keeps the same imports under ``if TYPE_CHECKING:`` for type checkers and for the
  stage code closure (:mod:`tasks.imports` reads every import statement in a file).
- :func:`lazy_module`: a stand-in for a module (``torch``) bound at module level, which imports
  the real one at its first attribute access; modules whose functions use torch but which must
  import without it (the method registry, read by parameter validation) bind ``torch`` to it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` that import ``exports`` (relative module ->
    names) on first access. Other attribute names that are submodules of the package are
    imported too (``import wanda; wanda.masks`` keeps working)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        namespace = sys.modules[package].__dict__
        module = where.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later lookups find it directly
        return value

    def __dir__() -> list[str]:
        return sorted(set(sys.modules[package].__dict__) | set(where))

    return __getattr__, __dir__


class _LazyModule(types.ModuleType):
    """Stands for module ``__name__`` until an attribute is read; then imports the real one."""

    def __getattr__(self, attr: str) -> Any:
        real = self.__dict__.get("_real")
        if real is None:
            real = self.__dict__["_real"] = importlib.import_module(self.__name__)
        return getattr(real, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name: str) -> types.ModuleType:
    """The module ``name`` if it is already imported, else a stand-in that imports it on first use."""
    return sys.modules.get(name) or _LazyModule(name)


def torch_no_grad(function: Callable) -> Callable:
    """``@torch.no_grad()`` that imports torch when ``function`` runs, not when it is defined."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapper
