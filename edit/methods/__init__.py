"""Editing methods, one file each. Importing this package registers every method in it.

Each file holds the method's hyperparameter dataclass (the paper's defaults), its registration
(:func:`edit.registry.register`) and the function that computes its :class:`edit.Edit` without
applying it. Every module of this package is imported here, in name order, so a new method is a
new file here (and its test); nothing else changes.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # registers the method(s) the module defines
