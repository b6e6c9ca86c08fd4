"""Editing methods, one file each. Importing this package registers every method in it.

Each file holds the method's hyperparameter dataclass (the paper's defaults), its registration
(:func:`edit.registry.register`) and the function that computes its :class:`edit.Edit` without
applying it. A new method is a new file here plus its line below; nothing else changes.
"""

from . import rome, memit, ft, kn, alphaedit, grace, ike  # noqa: F401  (registers them)
