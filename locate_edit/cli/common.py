"""What several subcommands share: model arguments, where data lives, checking paths before a model loads."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import locate
from edit import InvalidHparamsError
from edit.stats import MODEL_SAMPLES, check_corpus_file
from edit.eval.datasets import DatasetError, DatasetNotFoundError, find_data_dir  # noqa: F401  (re-exported)
from locate.causal_trace import load_facts
from locate.errors import LocateEditError

def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--device``, shared by every subcommand that runs a model."""
    parser.add_argument("--model", default=None,
                        help="Hugging Face name or local directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def load_model(args) -> locate.HookedLM:
    return locate.load_model(getattr(args, "model", None), device=getattr(args, "device", None))


def corpus_arg(value: str | None):
    """``--corpus``: ``None`` (the packaged WikiText-2 head, :data:`edit.stats.DEFAULT_CORPUS`),
    ``model-samples``, ``hf:...``, or a text file that must exist (checked before any model is loaded)."""
    if value is None or value == MODEL_SAMPLES or value.startswith("hf:"):
        return value
    return check_corpus_file(value)  # missing, binary or undecodable: refused now


CORPUS_HELP = ("text for the key statistics: a text file, 'hf:<dataset>', or 'model-samples' (text the model "
               "writes, slow); default: the WikiText-2 validation head shipped with the package")


def existing_file(path: str | None, what: str) -> Path | None:
    """``path`` as a Path, checked before any model is loaded."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise DatasetNotFoundError(f"{what} not found: {p}")
    return p


def output_path(path: str | None, what: str) -> Path | None:
    """``path`` as a Path, checked before any model is loaded: not a directory, and its folder exists
    (or can be created) and is writable, so that a long run does not fail when it saves."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise DatasetError(f"{what} {p} is a directory; give a file name")
    folder = p.parent
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists will hold the new ones
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise DatasetError(f"cannot write the {what} {p}: {folder} is not a writable folder")
    return p


def facts_arg(path: str) -> list[dict]:
    """The facts of a JSON file (known_1000 shape), read and checked before any model is loaded."""
    p = existing_file(path, "facts file")
    try:
        return load_facts(p)
    except LocateEditError:
        raise
    except (ValueError, TypeError, AttributeError) as e:  # malformed JSON, or not a list of objects
        raise DatasetError(f"{p}: not a JSON list of {{prompt, subject, attribute}} facts ({e})") from e


def print_top(lm, prompt: str, title: str, k: int = 5) -> None:
    print(f"{title} {prompt!r}:")
    for tp in lm.predict(prompt, k):
        print(f"  {tp.token!r:>14}  {tp.prob:.4f}")


def parse_assignment(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` → (key, value), the value read as JSON when it parses (``3``, ``[1, 2]``, ``null``),
    else kept as a string."""
    if "=" not in text:
        raise InvalidHparamsError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def parse_method_hparams(items) -> dict[str, dict]:
    """``METHOD:KEY=VALUE`` items (bench scripts' ``--hparam``) → ``{method: {key: value}}``."""
    out: dict[str, dict] = {}
    for item in items or []:
        if ":" not in item:
            raise InvalidHparamsError(f"expected METHOD:KEY=VALUE, got {item!r}")
        method, kv = item.split(":", 1)
        k, v = parse_assignment(kv)
        out.setdefault(method, {})[k] = v
    return out
