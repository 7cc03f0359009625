"""Method registry. Every module in this package registers its methods on import, so adding a
method is adding one file."""

import importlib
import pkgutil

from fewtune.methods.base import METHODS, Method, Predictions, RunContext, register

_SKIP = {"base"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SKIP and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Method", "Predictions", "RunContext", "register"]
