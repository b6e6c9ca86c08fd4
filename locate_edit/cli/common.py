"""What several subcommands share: model arguments, where data lives, checking paths before a model loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import locate
from edit import InvalidHparamsError
from edit.stats import MODEL_SAMPLES
from edit.eval.datasets import DatasetNotFoundError, find_data_dir  # noqa: F401  (re-exported for the subcommands)

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
    return existing_file(value, "corpus file")


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
