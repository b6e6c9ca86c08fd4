"""Small file helpers shared by the result dataclasses' ``save``/``load``, and where the data lives."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import DataFileNotFoundError


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON (numpy scalars as floats), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, default=float))
    return path


def read_json(path: str | Path, what: str) -> Any:
    """Parse the JSON file at ``path``; a missing file raises ``FileNotFoundError`` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"no {what} file at {path}")
    return json.loads(path.read_text())


def data_dir_candidates() -> list[Path]:
    """Where the toolkit looks for its data directory (laid out like ``shared/data``), in order:
    ``$LOCATE_EDIT_DATA``, ``./shared/data``, ``../shared/data``, the ``shared/data`` beside this checkout.
    The one search order of every lookup (tracing's noise subjects, :func:`edit.eval.find_data_dir`)."""
    env = os.environ.get("LOCATE_EDIT_DATA")
    return ([Path(env).expanduser()] if env else []) + [
        Path("shared/data"), Path("../shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data"]
