"""Resumable records for the bench scripts: one JSON file per unit of work, tagged with the settings that
made it. A file made under other settings is not reused."""

from __future__ import annotations

import json
from pathlib import Path


def read(path: Path, settings: dict) -> dict | None:
    """The record at ``path`` if it was made under ``settings``, else None."""
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("settings") == settings:
            return rec
    return None


def write(path: Path, settings: dict, body: dict) -> dict:
    """Write ``{"settings": settings, **body}`` to ``path`` atomically and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"settings": settings, **body}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, default=float))
    tmp.replace(path)
    return rec
