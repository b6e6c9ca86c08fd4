"""Sequential editing: apply edits batch after batch to the same model, and measure as it goes.

This is the harness behind the knowledge-editing survey's sequential-editing curves (Yao et al.
2023, §4; Gupta et al. 2024 on model collapse under repeated ROME edits): requests are written in
batches of ``batch_size``, each batch on the model that already carries all earlier batches. With
a batched method (``batched=True`` in the registry, e.g. MEMIT) each batch is one edit; with a
single-fact method (ROME) each request of a batch is its own edit, applied one after another. At the chosen checkpoints a
user callback measures the model (efficacy on everything written so far, perplexity, ...).

Every :class:`edit.Edit` is kept, in order, so the whole sequence reverts bit-exactly
(:meth:`SequentialRun.revert`). If anything fails midway, the edits made so far are reverted before
the error propagates: the model is left as it was found.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from locate import resolve_model
from locate.errors import InvalidArgumentError

from ..edit import Edit
from ..registry import Runtime, check_requests, get_method, write
from ..request import InvalidRequestError, Request


@dataclass
class Checkpoint:
    """The callback's result after ``n_edits`` requests (``n_batches`` batches) were written."""

    n_edits: int
    n_batches: int
    seconds: float  # editing time so far (callback time excluded)
    value: Any = None


@dataclass
class SequentialRun:
    """The edits of a sequential run, in order of application, and the checkpoint measurements."""

    method: str
    batch_size: int
    requests: list[Request]
    edits: list[Edit] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    n_edits: int = 0  # requests written so far
    n_batches: int = 0  # batches written so far
    seconds: float = 0.0

    @property
    def requests_done(self) -> list[Request]:
        return self.requests[: self.n_edits]

    def revert(self) -> "SequentialRun":
        """Revert every applied edit, last first: the model gets back its weights bit for bit."""
        for e in reversed(self.edits):
            if e.is_applied:
                e.revert()
        return self

    def to_dict(self) -> dict:
        return {"method": self.method, "batch_size": self.batch_size, "n_edits": self.n_edits,
                "seconds": self.seconds, "requests": [r.to_dict() for r in self.requests],
                "checkpoints": [c.__dict__ for c in self.checkpoints],
                "edits": [{"layers": e.layers, "n_requests": len(e.requests), "timings": e.timings} for e in self.edits]}

    def save(self, path: str | Path, *, edits: bool = False) -> Path:
        """Write the run as JSON; with ``edits=True`` also every edit as ``<stem>-edits/00000.safetensors``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        if edits:
            d = path.with_name(path.stem + "-edits")
            d.mkdir(exist_ok=True)
            for i, e in enumerate(self.edits):
                e.save(d / f"{i:05d}.safetensors")
        return path


def _checkpoint_counts(checkpoints, n: int, batch_size: int) -> list[int]:
    """Edit counts after which to call back, moved up to the batch boundary that reaches them."""
    if checkpoints is None:
        return list(range(batch_size, n, batch_size)) + [n]
    if isinstance(checkpoints, int):  # every ``checkpoints`` batches
        if checkpoints < 1:
            raise InvalidArgumentError("checkpoints (every how many batches) must be at least 1")
        step = checkpoints * batch_size
        return sorted(set(list(range(step, n, step)) + [n]))
    counts = sorted(set(int(c) for c in checkpoints))
    if counts and (counts[0] < 1 or counts[-1] > n):
        raise InvalidArgumentError(f"checkpoints are numbers of edits in 1..{n}, got {counts}")
    return sorted({min(n, -(-c // batch_size) * batch_size) for c in counts})


def sequential(requests: Sequence[Request], method: str = "rome", batch_size: int = 1, *, model=None,
               checkpoints: Sequence[int] | int | None = None,
               callback: Callable[[Any, SequentialRun], Any] | None = None,
               hparams: dict | None = None, runtime: Runtime | None = None, progress: bool = True,
               batches: Sequence[Sequence[Request]] | None = None,
               replay: Callable[[int], list[Edit] | None] | None = None,
               on_batch: Callable[[int, list[Edit], float], None] | None = None) -> SequentialRun:
    """Write ``requests`` into the model in batches of ``batch_size``, each batch on top of the last.

    ``method``: any name of :func:`edit.methods` (``"rome"``, ``"memit"``, ``"ft"``, ...); batched
    methods make one edit per batch, single-fact methods one edit per request. ``hparams`` go to the
    method. ``checkpoints``: numbers of written requests after which ``callback(lm, run)`` is called
    (moved up to the next batch boundary), an int for "every that many batches", or None for every
    batch; its return values are kept in ``run.checkpoints``.

    Returns the :class:`SequentialRun`, with all its edits applied to the model; ``run.revert()``
    restores the original weights bit-exactly. On any exception the edits made so far are reverted first.

    The evaluation harness's sequential mode runs through here too, with ``batches`` (one per case:
    its requests), ``replay(b)`` (the stored edits of batch ``b`` when resuming, else None) and
    ``on_batch(b, edits, seconds)`` (to store them); ``checkpoints`` then count batches' requests.
    """
    lm = resolve_model(model)
    m = get_method(method)
    if batches is None:
        requests = [requests] if isinstance(requests, Request) else list(requests)
        if not requests:
            raise InvalidRequestError("no requests given")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
        batches = [requests[i: i + batch_size] for i in range(0, len(requests), batch_size)]
    else:
        batches = [list(b) for b in batches]
        requests = [r for b in batches for r in b]
    check_requests(requests, lm)
    if checkpoints is None and len({len(b) for b in batches}) > 1:  # uneven batches: call back after each
        counts = list(itertools.accumulate(len(b) for b in batches))
    else:
        counts = _checkpoint_counts(checkpoints, len(requests), batch_size)
    run = SequentialRun(m.name, batch_size, requests)
    rt = runtime or Runtime(progress=False)
    try:
        with tqdm(total=len(requests), desc=f"sequential {m.name}", unit="edit", disable=not progress) as bar:
            for b, batch in enumerate(batches):
                t0 = time.perf_counter()
                stored = replay(b) if replay is not None else None
                if stored is not None:
                    for e in stored:
                        run.edits.append(e.apply(lm))
                else:
                    new = write(m, batch, model=lm, hparams=hparams, runtime=rt)
                    run.edits += new
                    if on_batch is not None:
                        on_batch(b, new, time.perf_counter() - t0)
                run.seconds += time.perf_counter() - t0
                run.n_edits += len(batch)
                run.n_batches = b + 1
                bar.update(len(batch))
                if run.n_edits in counts:
                    value = callback(lm, run) if callback is not None else None
                    run.checkpoints.append(Checkpoint(run.n_edits, b + 1, run.seconds, value))
    except BaseException:
        run.revert()
        raise
    return run
