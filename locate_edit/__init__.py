"""locate_edit: the top of the stack, the ``locate-edit`` command line (``cli/``, one file per subcommand).

Layering of the whole project: ``locate`` (hooked model, locators) → ``edit`` (edits, the method
registry, the methods) → ``edit.eval`` (datasets, metrics, harness) → ``viz`` (figures) → here.
"""
