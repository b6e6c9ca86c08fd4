"""PCGU: Partitioned Contrastive Gradient Unlearning (Yu, Jeoung and Diesner, Findings of ACL 2023,
"Unlearning Bias in Language Models by Partitioning Gradients").

A bias pair is one :class:`edit.Request`: the rendered prompt is the context the two sentences share,
``target_true`` the **advantaged** (stereotypical) continuation a and ``target_new`` the
**disadvantaged** (anti-stereotypical) one d. (WinoGender: the pronoun of the gender the occupation's
BLS statistics favour is advantaged, :func:`edit.eval.datasets.load_winogender_pairs`.)

**Gradients.** For the pairs of one batch B, on the current weights θ,

    ∇_a = ∂/∂θ Σ_{i∈B} log P_θ(a_i | p_i),      ∇_d = ∂/∂θ Σ_{i∈B} log P_θ(d_i | p_i)            (1)

with log P of a continuation teacher-forced and summed over its tokens (``objective="logprob"``).

**Partitions.** Every parameter θ_P of the model is cut into vectors (``aggregation="input"``, the
reference default): a weight matrix of shape (d_out, d_in) into its d_out rows, each row being all the
weights *into* one output unit (the rows of a ``torch.nn.Linear``; GPT-2's ``Conv1D`` stores (d_in,
d_out) and is read transposed so that a partition is the same thing on every architecture); an embedding
into its token vectors; a 1-D parameter (bias, norm gain) is one partition whole. ``aggregation="output"``
cuts matrices into columns instead (all weights *out of* one input unit).

**Ranking.** For each partition j, the cosine between the two gradients restricted to it,

    s_j = cos(∇_d[j], ∇_a[j]) = <∇_d[j], ∇_a[j]> / (‖∇_d[j]‖ ‖∇_a[j]‖)                          (2)

A partition the batch does not reach (no gradient at all) gets s_j = 5, so it ranks last. The k
partitions with the smallest s_j (the most *contrastive*, not the largest gradients) form the set S.

**Step.** One SGD step (no momentum, no weight decay) on the partitions in S only, minimising the
advantaged log-likelihood (``direction="advantaged"``, the reference default):

    θ[j] ← θ[j] − η ∇_a[j]   for j ∈ S;      θ[j] unchanged otherwise                             (3)

``direction="disadvantaged"`` maximises the disadvantaged one instead: θ[j] ← θ[j] + η ∇_d[j].
Each batch of ``batch_size`` pairs (in order) is one step, with S chosen anew from its own gradients;
``epochs`` passes over the pairs. Defaults are the reference code's (``src/pcgu.py`` of the paper's
repository): k = 10 000, η = 1e-5, 5 epochs, batch 16, input aggregation, minimise advantaged.

The change is returned as an :class:`edit.Edit` of dense :class:`edit.WeightDelta` s, one per parameter
that moved, each zero (bit for bit) outside the rows of S; ``Edit.metrics["selected_rows"]`` lists the
rows each parameter had selected over all steps (``[0]`` for a 1-D parameter). The model is restored
bit-exactly.

How this differs from the reference code:

* The reference ran PCGU on masked LMs only (its causal-LM branch raises ``NotSupportedError``): it
  scored the pronoun at the [MASK] of the whole sentence, by its **raw logit**. Here the models are
  causal: the pair shares the prompt (the sentence up to the first word where they differ) and (1)
  scores the continuations by log-probability, the quantity the paper's equations name. The reference's
  raw-logit objective is ``objective="logit"`` (Σ of the target tokens' logits, teacher-forced).
* The forward runs in evaluation mode (no dropout); the reference trained in ``train()`` mode.
* k larger than the number of partitions takes them all (the reference's ``topk`` would fail).
* ``params``: an optional regular expression over parameter names that restricts the candidate
  partitions (``None``, the reference: every parameter). Not done: the reference's "dynamic" direction
  (choosing per pair which side is advantaged from the model's own scores).
"""

from __future__ import annotations

import math
import numbers
import re
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from locate.errors import EditFailedError, InvalidHparamsError

from ..edit import Edit, WeightDelta
from ..registry import Runtime, register
from ..request import InvalidRequestError, Request

AGGREGATIONS = ("input", "output")
DIRECTIONS = ("advantaged", "disadvantaged")
OBJECTIVES = ("logprob", "logit")
UNREACHED = 5.0  # s_j of a partition without gradient: above any cosine, so ranked last (the reference's value)


@dataclass
class PCGUHparams:
    """PCGU's hyperparameters; defaults are the reference code's (module docstring)."""

    k: int = 10000  # partitions updated per step: the k with the lowest gradient cosine, Eq. (2)
    lr: float = 1e-5  # η of the SGD step (3)
    epochs: int = 5  # passes over the pairs
    batch_size: int = 16  # pairs per step; S is chosen anew each step from that batch's gradients
    aggregation: str = "input"  # "input": a partition is a matrix row (weights into one unit); "output": a column
    direction: str = "advantaged"  # "advantaged": minimise log P(target_true); "disadvantaged": maximise log P(target_new)
    objective: str = "logprob"  # "logprob": Eq. (1); "logit": the reference's masked-LM raw logits of the targets
    params: str | None = None  # regex over parameter names restricting the candidates; None = every parameter

    def __post_init__(self):
        for name in ("k", "epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise InvalidHparamsError(f"lr must be a finite positive number, got {self.lr!r}")
        for name, allowed in (("aggregation", AGGREGATIONS), ("direction", DIRECTIONS), ("objective", OBJECTIVES)):
            if getattr(self, name) not in allowed:
                raise InvalidHparamsError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.params is not None:
            try:
                re.compile(self.params)
            except (re.error, TypeError) as e:
                raise InvalidHparamsError(f"params must be a regular expression, got {self.params!r}: {e}") from e


# ---------------------------------------------------------------------------------------- partitions
@dataclass(frozen=True)
class Partitioned:
    """One candidate parameter: its name (as ``lm.parameter`` takes it), the tensor, and whether its
    storage is (d_in, d_out) (GPT-2 ``Conv1D``) and must be read transposed to have output units as rows."""

    name: str
    param: torch.nn.Parameter
    transposed: bool


def candidate_parameters(lm, pattern: str | None = None) -> list[Partitioned]:
    """Every parameter of the model (or those whose name matches ``pattern``), in the model's order.
    A parameter that shares weights with one listed before it is left out, so each weight is in
    exactly one partition (the bridge exposes GPT-2's fused ``c_attn`` and its q, k, v as views of it)."""
    modules = dict(lm.bridge.named_modules())
    out = []
    taken: dict[int, torch.Tensor] = {}  # storage -> which of its elements a kept parameter already covers
    for name, p in lm.bridge.named_parameters():
        if pattern is not None and re.search(pattern, name) is None:
            continue
        storage = p.untyped_storage()
        size = storage.nbytes() // p.element_size()
        cells = torch.arange(size, device="cpu").as_strided(p.shape, p.stride(), p.storage_offset()).reshape(-1)
        seen = taken.setdefault(storage.data_ptr(), torch.zeros(size, dtype=torch.bool))
        if bool(seen[cells].any()):
            continue  # a view of weights already listed (GPT-2's fused qkv beside its q, k, v views)
        seen[cells] = True
        owner = modules.get(name.rsplit(".", 1)[0])
        transposed = p.ndim == 2 and type(owner).__name__ == "Conv1D"
        out.append(Partitioned(name, p, transposed))
    if not out:
        raise InvalidHparamsError(f"no parameter of {lm.name} matches params={pattern!r}")
    return out


def as_partitions(t: torch.Tensor, transposed: bool, aggregation: str) -> torch.Tensor:
    """A view of ``t`` (a parameter or its gradient) with one partition per row: output units' rows
    for ``"input"`` aggregation, columns for ``"output"``; a 1-D tensor is a single row. Writing into
    the view writes into ``t``."""
    if t.ndim == 1:
        return t.unsqueeze(0)
    m = t.reshape(-1, t.shape[-1]) if t.ndim > 2 else t
    if transposed:
        m = m.T
    return m.T if aggregation == "output" else m


def partition_similarities(grads_d: dict, grads_a: dict, table: Sequence[Partitioned], aggregation: str):
    """Eq. (2) for every partition: ``(s, index)`` with ``s`` a float32 vector of cosines and
    ``index[j] = (parameter name, row)`` (row 0 for a 1-D parameter). A parameter either gradient
    misses gets :data:`UNREACHED` on all its partitions."""
    sims, index = [], []
    for entry in table:
        gd, ga = grads_d.get(entry.name), grads_a.get(entry.name)
        rows = as_partitions(entry.param.detach(), entry.transposed, aggregation).shape[0]
        if gd is None or ga is None:
            sims.append(torch.full((rows,), UNREACHED))
        else:
            sims.append(F.cosine_similarity(as_partitions(gd.float(), entry.transposed, aggregation),
                                            as_partitions(ga.float(), entry.transposed, aggregation), dim=-1).cpu())
        index.extend((entry.name, r) for r in range(rows))
    return torch.cat(sims), index


def select_partitions(sims: torch.Tensor, index: Sequence[tuple[str, int]], k: int) -> dict[str, list[int]]:
    """S: the k partitions of lowest cosine (all of them if there are fewer), as ``{name: rows}``."""
    k = min(int(k), len(index))
    chosen = torch.topk(sims, k, largest=False, sorted=True).indices.tolist()
    out: dict[str, list[int]] = {}
    for j in chosen:
        name, row = index[j]
        out.setdefault(name, []).append(row)
    return out


# ---------------------------------------------------------------------------------------- gradients
def continuation_scores(lm, rows: Sequence[tuple[list[int], list[int]]], objective: str) -> torch.Tensor:
    """Per pair side, Σ over the target tokens of log P (``"logprob"``, Eq. 1) or of the raw logit
    (``"logit"``), teacher-forced on prompt + target; differentiable in the weights."""
    batch = lm.pad([p + t for p, t in rows])
    logits = lm.forward(batch)
    out = []
    for i, (p, t) in enumerate(rows):
        at = logits[i, len(p) - 1: len(p) - 1 + len(t)].float()  # position k predicts token k + 1
        if objective == "logprob":
            at = torch.log_softmax(at, -1)
        out.append(at[torch.arange(len(t), device=at.device), torch.as_tensor(t, device=at.device)].sum())
    return torch.stack(out)


def pair_gradients(lm, table: Sequence[Partitioned], rows_d, rows_a, objective: str):
    """(∇_d, ∇_a) of Eq. (1) for one batch, as ``{name: gradient or None}`` (None: not reached)."""
    params = [e.param for e in table]
    grads = []
    for rows in (rows_d, rows_a):
        total = continuation_scores(lm, rows, objective).sum()
        g = torch.autograd.grad(total, params, allow_unused=True)
        grads.append({e.name: gi for e, gi in zip(table, g)})
    return grads[0], grads[1]


# ---------------------------------------------------------------------------------------- the method
@register("pcgu", PCGUHparams, batched=True, layers=None, smoke={"epochs": 1, "lr": 0.05},
          description="PCGU: SGD on the k weight rows whose stereotypical/anti-stereotypical gradients "
                      "differ most (Yu et al. 2023)")
def compute_pcgu(lm, requests: list[Request], hp: PCGUHparams, rt: Runtime) -> Edit:
    """PCGU edit of the bias pairs ``requests`` (not applied): ``target_true`` is the advantaged
    continuation, ``target_new`` the disadvantaged one; Eqs. (1)-(3) of the module docstring."""
    missing = [r for r in requests if r.target_true is None or not r.target_true.strip()]
    if missing:
        raise InvalidRequestError(f"PCGU needs each pair's advantaged continuation as target_true; "
                                  f"{len(missing)} request(s) have none, e.g. {missing[0]!r}")
    table = candidate_parameters(lm, hp.params)
    pairs = [(lm.encode(r.rendered), lm.target_ids(r.target_new, r.rendered), lm.target_ids(r.target_true, r.rendered))
             for r in requests]
    start = {e.name: e.param.detach().clone() for e in table}
    selected: dict[str, set[int]] = {}
    trace: list[dict] = []
    t0 = time.perf_counter()
    try:
        with lm.eval_mode():
            for e in table:
                e.param.requires_grad_(True)
            for epoch in range(hp.epochs):
                for b in range(0, len(pairs), hp.batch_size):
                    chunk = pairs[b: b + hp.batch_size]
                    rows_d = [(p, d) for p, d, _ in chunk]
                    rows_a = [(p, a) for p, _, a in chunk]
                    grads_d, grads_a = pair_gradients(lm, table, rows_d, rows_a, hp.objective)
                    sims, index = partition_similarities(grads_d, grads_a, table, hp.aggregation)
                    S = select_partitions(sims, index, hp.k)
                    _sgd_step(table, S, grads_d, grads_a, hp)
                    for name, rs in S.items():
                        selected.setdefault(name, set()).update(rs)
                    trace.append({"epoch": epoch, "batch": b // hp.batch_size,
                                  "min_cosine": float(sims.min()), "kth_cosine": float(sims.sort().values[
                                      min(hp.k, len(index)) - 1])})
                    if rt.callback is not None:
                        rt.callback({"method": "pcgu", **trace[-1]})
        deltas = []
        for e in table:
            with torch.no_grad():
                diff = e.param.detach() - start[e.name]
            if not bool(torch.isfinite(diff).all()):
                raise EditFailedError(f"pcgu: the update of {e.name} is not finite (lr={hp.lr} too large?)")
            if bool(diff.ne(0).any()):
                deltas.append(WeightDelta(e.name, dense=diff.clone()))
    finally:
        with torch.no_grad():
            for e in table:
                e.param.copy_(start[e.name])  # bit-exact restore, success or failure
                e.param.grad = None
    return Edit("pcgu", requests, deltas, lm.fingerprint, lm.name, "",
                hparams=asdict(hp), timings={"total_s": time.perf_counter() - t0}, loss_trace=trace,
                metrics={"selected_rows": {n: sorted(rs) for n, rs in selected.items()}})


@torch.no_grad()
def _sgd_step(table: Sequence[Partitioned], S: dict[str, list[int]], grads_d: dict, grads_a: dict,
              hp: PCGUHparams) -> None:
    """Eq. (3) on the rows of S (in place); rows outside S are not written."""
    for e in table:
        rows = S.get(e.name)
        if not rows:
            continue
        if hp.direction == "advantaged":  # minimise log P(a): step along -∇_a
            g = grads_a[e.name]
            sign = 1.0
        else:  # maximise log P(d): step along +∇_d
            g = grads_d[e.name]
            sign = -1.0
        if g is None:
            continue  # an unreached partition only enters S when k exceeds the reached ones; it has no step
        view = as_partitions(e.param.data, e.transposed, hp.aggregation)
        step = as_partitions(g, e.transposed, hp.aggregation)
        idx = torch.as_tensor(rows, device=view.device)
        view[idx] = (view[idx].float() - sign * hp.lr * step[idx].float()).to(view.dtype)
