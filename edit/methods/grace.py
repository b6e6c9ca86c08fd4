"""GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen et al., NeurIPS 2023).

GRACE leaves every weight alone. It wraps ONE layer's MLP output projection (Llama's ``down_proj``,
GPT-2's ``c_proj``) with a discrete key-value *codebook*; each entry holds

    a key    k_i  (d_mlp):   the input of the projection (``lm.hook_mlp_key(l)``) at the edited
                             prompt's LAST token,
    a value  v_i  (d_model): a replacement for the projection's output (``lm.hook_mlp_out(l)``),
    a deferral radius ε_i, and a label y_i (the target string).

Inference (token-wise). For every sequence and every token position t, the query q_t is the
projection's input at t. With d = min_i ‖q_t − k_i‖₂ (Euclidean) at the nearest key i: if d ≤ ε_i
the MLP output at t is replaced by v_i, otherwise the layer computes what it always did. This is the
reference's ``replacement="replace_last"`` applied at whichever position's query falls in a ball,
so teacher-forced scoring of prompt + target and generation with a key/value cache (one token per
step) both see the edit at the prompt's last token. Where no position of a batch is in any ball the
hook returns its input tensor itself: out-of-scope inputs give exactly the base model's outputs.

Adding the entry of a request (query q = its key, label y), against the current codebook:

* codebook empty → add (q, v, ε_init);
* else, nearest key k_j at distance d:
    - d > ε_init + ε_j (no ball near)       → add (q, v, ε_init);
    - y ≠ y_j (conflict)                    → add (q, v, d/2) and shrink ε_j ← d/2 − 1e-5;
    - y = y_j, d > ε_j ("coverage")         → no new entry; ε_j ← d (and entry j's value is trained
      on this request too). ``eps_expand="moving_average"`` also moves k_j ← (k_j + q)/2.

The value v is initialised "cold" (uniform on [0, 1)^d_model, from a generator seeded with
``Runtime.seed``) or "warm" (the layer's current MLP output at the key token), then trained by Adam
(``edit_lr``) for ``n_iter`` steps on the negative log-likelihood of the target tokens, teacher
forced on prompt + target, with v substituted at the key position of the training row only.

Defaults are EasyEdit's for Llama-2-7B (``hparams/GRACE/llama-7b.yaml``): n_iter 50, edit_lr 1.0,
eps 1.0, cold init, coverage expansion, replace_last, Euclidean distance. EasyEdit wraps layer 27 of
32, a late layer (an earlier version of that file: layer 31, 100 steps, replace_prompt). Here
``layers="auto"`` gives the peak MLP effect of causal tracing (often an early-middle layer); pass an
int (e.g. ``round(0.85 * lm.n_layers)``) for the paper's late-layer placement. ε is absolute, in
the units of the MLP key: 1.0 suits Llama-2-7B, but a model whose keys have another scale needs
another ε (too large and every prompt falls in the ball; too small and paraphrases fall outside).

How this differs from the reference code (EasyEdit ``easyeditor/models/grace/GRACE.py``):

* One GRACE call returns one :class:`edit.Edit` whose codebook holds only its own requests' entries
  (several for a batch, with the rules above applied among them in order). The edits already applied
  to the model are never modified (they are reversible, content-addressed objects). For sequential
  editing, the keys, radii and labels of the GRACE codebooks already applied at the same layer are
  read and the rules applied to each new entry against them, as far as they concern the NEW entry:
  against a conflicting older key at distance d ≤ ε_init + ε_j the new radius is min(ε_init, d/2);
  against a same-label older key a new entry is added (radius ε_init) instead of widening the older
  ball. The older radius is NOT shrunk to d/2; instead codebooks applied later run later in the
  forward and override where they match, so inside the new ball the new value wins, and the old ball
  keeps answering only outside it. The reference would leave queries that lie in the old ball but
  more than d/2 from the old key unedited; here they still get the old value. Likewise the nearest
  key is chosen per codebook, not over the union of all codebooks.
* Within one codebook, ties between equally near keys go to the later entry (the reference takes the
  earlier one, which after a zero-distance conflict has radius −1e-5, so neither fact would apply).
* A batch's values are trained jointly (one forward per step, the loss the sum of each request's
  mean target NLL; entries are independent, so this equals training them one by one up to
  round-off), where the reference edits one request at a time. In the coverage case the shared
  value is trained on both requests at once rather than on the later one after the earlier one.
* The reference runs its Adam over every parameter with a gradient (only the codebook values) and
  compares labels as tensors of token ids; here Adam sees only the new values, and labels are the
  target strings (compared after stripping surrounding white space).
* The reference reads its query at ONE position per forward: the key position of the last edit made
  (or the last token, in ``generate``), and replaces only there; here every position is looked up.
  Its distances are float32 ``torch.cdist``; ours are float64 without the matmul shortcut.
* Only ``replace_last`` and Euclidean distance; the reference's ``replace_all``/``replace_prompt``,
  adversarial value training (``val_train="adv"``) and other distances are not implemented.
* A conflict at distance d = 0 (the same prompt edited again) gives the new entry radius 0: it then
  applies only when the query equals the key exactly, as in the reference. Queries are compared in
  float64 without the matmul shortcut, so the same prompt run the same way matches exactly, but a
  different batch composition can change activations by round-off and miss a radius-0 ball.

:func:`grace_without` removes one entry from a GRACE edit (revert the old edit, apply the new one);
the radii that entry's conflicts shrank stay shrunk.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from locate import resolve_layer
from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError
from locate.hooks import capture

from ..edit import Edit, HookModule
from ..registry import Runtime, compute, register
from ..request import Request

SPLIT_MARGIN = 1e-5  # the reference's margin: a conflicting older radius becomes d/2 − 1e-5


@dataclass
class GRACEHparams:
    """GRACE's hyper-parameters; defaults are EasyEdit's Llama-2-7B settings."""

    layers: Any = "auto"  # layer spec (locate.resolve_layers, one layer); "auto" = causal-tracing peak.
    #                       EasyEdit/the paper wrap a late layer (27 of Llama-2-7B's 32): pass an int for that
    n_iter: int = 50  # Adam steps training each new value (EasyEdit: 50)
    edit_lr: float = 1.0  # Adam learning rate of the values (EasyEdit: 1.0)
    eps: float = 1.0  # ε_init, the initial deferral radius, absolute, in MLP-key units (EasyEdit: 1.0)
    eps_expand: str = "coverage"  # same-label key within reach: "coverage" (ε_j ← d) or "moving_average"
    val_init: str = "cold"  # value init: "cold" = uniform [0, 1) (EasyEdit), "warm" = the layer's output

    def __post_init__(self):
        if self.eps_expand not in ("coverage", "moving_average"):
            raise InvalidHparamsError(f"eps_expand must be 'coverage' or 'moving_average', got {self.eps_expand!r}")
        if self.val_init not in ("cold", "warm"):
            raise InvalidHparamsError(f"val_init must be 'cold' or 'warm', got {self.val_init!r}")
        if not self.eps >= 0:
            raise InvalidHparamsError(f"eps must be a non-negative number, got {self.eps!r}")
        if self.n_iter < 0:
            raise InvalidHparamsError(f"n_iter must be non-negative, got {self.n_iter}")


# ====================================================================== the codebook
def _same_label(a: str, b: str) -> bool:
    return a.strip() == b.strip()


class GraceCodebook(HookModule):
    """GRACE's key-value codebook at one layer: ``keys`` (N, d_mlp), ``values`` (N, d_model), ``radii``
    (N,), ``labels`` (N strings). Reads queries at ``key_hook`` (the MLP output projection's input)
    and replaces the output at ``out_hook`` (the MLP output) at every position whose query lies in an
    entry's ball (see the module docstring)."""

    type_name = "grace-codebook"

    def __init__(self, layer: int, key_hook: str, out_hook: str, keys: torch.Tensor, values: torch.Tensor,
                 radii: torch.Tensor, labels: Sequence[str]):
        super().__init__()
        n = len(labels)
        if keys.ndim != 2 or values.ndim != 2 or radii.ndim != 1 or not (keys.shape[0] == values.shape[0] == radii.shape[0] == n):
            raise InvalidArgumentError(f"a GRACE codebook needs keys (N, d_mlp), values (N, d_model), radii (N,) and N labels; "
                             f"got {tuple(keys.shape)}, {tuple(values.shape)}, {tuple(radii.shape)}, {n}")
        self.layer = int(layer)
        self.key_hook, self.out_hook = key_hook, out_hook
        self.labels = [str(x) for x in labels]
        self.register_buffer("keys", keys.detach().clone())
        self.register_buffer("values", values.detach().clone())
        self.register_buffer("radii", radii.detach().clone())
        self._query: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __bool__(self) -> bool:  # an empty codebook is still an intervention, not a false value
        return True

    def __repr__(self) -> str:
        return f"GraceCodebook(layer={self.layer}, entries={len(self)}, labels={self.labels[:3]}{'…' if len(self) > 3 else ''})"

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {"layer": self.layer, "key_hook": self.key_hook, "out_hook": self.out_hook, "labels": list(self.labels)}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "GraceCodebook":
        return cls(config["layer"], config["key_hook"], config["out_hook"], tensors["keys"], tensors["values"],
                   tensors["radii"], config["labels"])

    def without(self, index: int) -> "GraceCodebook":
        """A copy lacking entry ``index``."""
        keep = [i for i in range(len(self)) if i != index]
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.keys.device)
        return GraceCodebook(self.layer, self.key_hook, self.out_hook, self.keys[idx], self.values[idx],
                             self.radii[idx], [self.labels[i] for i in keep])

    # ------------------------------------------------------------------ lookup
    @torch.no_grad()
    def lookup(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For queries (..., d_mlp): ``(match, index, distance)``, each (...): the nearest entry (ties
        to the later one), its Euclidean distance (float64) and whether it is within that entry's radius."""
        shape = query.shape[:-1]
        n = len(self)
        if n == 0:
            z = torch.zeros(shape, dtype=torch.long, device=query.device)
            return z.bool(), z, torch.full(shape, float("inf"), dtype=torch.float64, device=query.device)
        flat = query.reshape(-1, query.shape[-1]).to(device=self.keys.device, dtype=torch.float64)
        keys = self.keys.to(torch.float64).flip(0)  # reversed, so that argmin's first minimum is the latest entry
        dist = torch.cdist(flat, keys, compute_mode="donot_use_mm_for_euclid_dist")  # (BT, N), no |a|²+|b|²−2ab round-off
        d, j = dist.min(-1)
        j = n - 1 - j
        match = d <= self.radii.to(torch.float64)[j]
        return match.reshape(shape), j.reshape(shape), d.reshape(shape)

    # ------------------------------------------------------------------ hooks
    def _read_query(self, x: torch.Tensor) -> torch.Tensor:
        self._query = x.detach()
        return x

    def _replace(self, y: torch.Tensor) -> torch.Tensor:
        q, self._query = self._query, None
        if q is None or len(self) == 0 or q.shape[:-1] != y.shape[:-1]:
            return y
        match, j, _ = self.lookup(q)
        if not bool(match.any()):
            return y  # the very tensor: the forward is bit-identical
        out = y.clone()
        out[match] = self.values[j[match]].to(device=out.device, dtype=out.dtype)
        return out

    def hook_fns(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {self.key_hook: self._read_query, self.out_hook: self._replace}


# ====================================================================== building a codebook
def _older_entries(lm, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Keys, radii and labels of the GRACE codebooks already applied to ``lm`` at ``layer``, oldest first."""
    keys, radii, labels = [], [], []
    for e in lm.applied_edits:
        for m in getattr(e, "hook_modules", []):
            if isinstance(m, GraceCodebook) and m.key_hook == lm.hook_mlp_key(layer) and len(m):
                keys.append(m.keys.to(device=lm.device, dtype=torch.float64))
                radii.append(m.radii.to(device=lm.device, dtype=torch.float64))
                labels += m.labels
    if not keys:
        return None, None, []
    return torch.cat(keys), torch.cat(radii), labels


def _nearest(keys: torch.Tensor | None, q: torch.Tensor) -> tuple[float, int]:
    """Distance to and index of the nearest of ``keys`` (ties to the later one); (inf, -1) if none."""
    if keys is None or keys.shape[0] == 0:
        return float("inf"), -1
    d = torch.linalg.vector_norm(keys - q[None], dim=-1).flip(0)
    j = int(d.argmin())
    return float(d[j]), keys.shape[0] - 1 - j


def build_entries(queries: torch.Tensor, labels: Sequence[str], hp: GRACEHparams, *,
                  older: tuple[torch.Tensor | None, torch.Tensor | None, list[str]] = (None, None, [])) -> dict:
    """Apply GRACE's codebook rules to new ``queries`` (B, d_mlp) with ``labels``, in order, against the
    entries already made here and the ``older`` (keys, radii, labels) of codebooks applied before.

    Returns ``{"keys": (N, d_mlp) float64, "radii": (N,) float64, "labels": [...], "entry_of": [B ints],
    "events": [B of "added" | "conflict" | "expanded" | "covered" | "conflict_older" | "beside_older"]}``."""
    eps = float(hp.eps)
    old_keys, old_radii, old_labels = older
    keys: list[torch.Tensor] = []
    radii: list[float] = []
    new_labels: list[str] = []
    entry_of: list[int] = []
    events: list[str] = []
    for q, y in zip(queries.to(torch.float64), labels):
        d_new, j_new = _nearest(torch.stack(keys) if keys else None, q)
        d_old, j_old = _nearest(old_keys, q)
        if j_new < 0 and j_old < 0:
            event, radius = "added", eps
        elif j_new >= 0 and d_new <= d_old:  # nearest is an entry of this codebook: the reference's rules
            d, j = d_new, j_new
            if d > eps + radii[j]:
                event, radius = "added", eps
            elif not _same_label(y, new_labels[j]):
                radii[j] = d / 2 - SPLIT_MARGIN
                event, radius = "conflict", d / 2
            else:
                if d > radii[j]:
                    radii[j] = d
                    if hp.eps_expand == "moving_average":
                        keys[j] = 0.5 * keys[j] + 0.5 * q
                    event = "expanded"
                else:
                    event = "covered"
                entry_of.append(j)
                events.append(event)
                continue
        else:  # nearest is in an older codebook, which is left as it is (later codebooks override)
            d, j = d_old, j_old
            if d > eps + float(old_radii[j]):
                event, radius = "added", eps
            elif not _same_label(y, old_labels[j]):
                event, radius = "conflict_older", min(eps, d / 2)
            else:
                event, radius = "beside_older", eps
        keys.append(q.clone())
        radii.append(radius)
        new_labels.append(str(y))
        entry_of.append(len(keys) - 1)
        events.append(event)
    return {"keys": torch.stack(keys), "radii": torch.tensor(radii, dtype=torch.float64, device=queries.device), "labels": new_labels,
            "entry_of": entry_of, "events": events}


def _store_dtype(lm) -> torch.dtype:
    return torch.promote_types(lm.dtype, torch.float32)


@torch.no_grad()
def _keys_and_outputs(lm, prompts: list[list[int]], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP key and the (current) MLP output at each prompt's last token: (B, d_mlp), (B, d_model)."""
    batch = lm.pad(prompts)
    rows = torch.arange(len(prompts), device=lm.device)
    key_site, out_site = lm.hook_mlp_key(layer), lm.hook_mlp_out(layer)
    with capture(lm, [key_site, out_site], keep=lambda s, x: x[rows, batch.last].clone()) as got:
        lm.forward(batch)
    return got[key_site], got[out_site]


# ====================================================================== the method
@register("grace", GRACEHparams, batched=True, layers=1, smoke={"n_iter": 5},
          description="GRACE: a key-value codebook at one MLP replaces its output near edited prompts (Hartvigsen et al. 2023)")
def compute_grace(lm, requests: list[Request], hp: GRACEHparams, rt: Runtime) -> Edit:
    """The GRACE edit of ``requests`` (one codebook, not applied). No weight of the model changes."""
    layer, layer_reason = resolve_layer(lm, hp.layers)
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()
    dtype = _store_dtype(lm)

    prompts = [lm.encode(r.rendered) for r in requests]
    targets = [lm.target_ids(r.target_new, r.rendered) for r in requests]
    queries, outputs = _keys_and_outputs(lm, prompts, layer)
    older = _older_entries(lm, layer)
    book = build_entries(queries, [r.target_new for r in requests], hp, older=older)
    n = len(book["labels"])
    timings["key_s"] = time.perf_counter() - t

    # initial values: cold = U[0, 1)^d_model (seeded), warm = the layer's output at the key token
    t = time.perf_counter()
    if hp.val_init == "cold":
        g = torch.Generator().manual_seed(int(rt.seed))
        init = torch.rand(n, lm.d_model, generator=g, dtype=torch.float32).to(device=lm.device, dtype=dtype)
    else:
        first = [book["entry_of"].index(i) for i in range(n)]  # the request that created each entry
        init = outputs[first].to(dtype)
    values = torch.nn.Parameter(init.clone())
    entry = torch.as_tensor(book["entry_of"], dtype=torch.long, device=lm.device)

    # train the values: NLL of the targets, teacher-forced, value substituted at the key position
    batch = lm.pad([p + o for p, o in zip(prompts, targets)])
    rows = torch.arange(len(requests), device=lm.device)
    key_pos = torch.as_tensor([len(p) - 1 for p in prompts], device=lm.device)
    pred_rows = torch.cat([torch.full((len(o),), b, dtype=torch.long) for b, o in enumerate(targets)]).to(lm.device)
    pred_pos = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(o)) for p, o in zip(prompts, targets)]).to(lm.device)
    gold = torch.as_tensor([i for o in targets for i in o], device=lm.device)
    n_tok = torch.as_tensor([len(o) for o in targets], dtype=torch.float32, device=lm.device)

    def put(y, hook):
        y = y.clone()
        y[rows, key_pos] = values[entry].to(y.dtype)
        return y

    def losses() -> torch.Tensor:  # each request's mean NLL over its target tokens, (B,)
        # the final hidden states, unembedded only where a target token is predicted
        with capture(lm, "unembed.hook_in", detach=False) as final:
            lm.forward(batch)
        h = final["unembed.hook_in"][pred_rows, pred_pos]
        logits = lm.bridge.unembed(h[None])[0].to(lm.device)  # lm_head may sit on another device
        nll = -torch.log_softmax(logits.float(), -1).gather(1, gold[:, None])[:, 0]
        return torch.zeros(len(requests), device=lm.device).index_add(0, pred_rows, nll) / n_tok

    # Blocks below the codebook's layer do not see the values: run them once, and start every training
    # forward at the layer from their saved output (the same numbers, a fraction of the work).
    with torch.no_grad(), capture(lm, lm.hook_resid_pre(layer)) as below:
        lm.forward(batch)

    trace: list[float] = []
    with lm.eval_mode(), lm.start_at_block(layer, below[lm.hook_resid_pre(layer)]), \
            lm.hooks([(lm.hook_mlp_out(layer), put)]):
        opt = torch.optim.Adam([values], lr=hp.edit_lr)
        for _ in range(hp.n_iter):
            opt.zero_grad()
            loss = losses()
            if not bool(torch.isfinite(loss).all()):
                raise EditFailedError(f"GRACE value training diverged (loss {loss.tolist()}); the model is unchanged")
            trace.append(float(loss.detach().mean()))
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            final = losses()
    if not bool(torch.isfinite(values).all()):
        raise EditFailedError("GRACE produced non-finite values; the model is unchanged")
    timings["train_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    codebook = GraceCodebook(layer, lm.hook_mlp_key(layer), lm.hook_mlp_out(layer), book["keys"].to(dtype),
                             values.detach().clone(), book["radii"].to(dtype), book["labels"])
    return Edit(
        method="grace",
        requests=list(requests),
        interventions=[codebook],
        fingerprint=lm.fingerprint,
        model_name=lm.name,
        layer_reason=layer_reason,
        hparams={**asdict(hp), "layers": [layer]},
        timings=timings,
        loss_trace=trace,
        metrics={"final_loss": float(final.mean()), "final_loss_per_request": final.tolist(),
                 "n_entries": n, "radii": codebook.radii.tolist(), "entry_of_request": book["entry_of"],
                 "events": book["events"], "n_older_entries": len(older[2]),
                 "value_norms": codebook.values.norm(dim=-1).tolist()},
    )


def grace_without(e: Edit, index: int) -> Edit:
    """A new, unapplied GRACE edit like ``e`` whose codebook lacks entry ``index`` (and the requests
    that entry answered). Revert ``e`` and apply the result to drop that fact. Radii shrunk by
    conflicts with the removed entry stay as they were."""
    books = [m for m in e.hook_modules if isinstance(m, GraceCodebook)]
    if e.method != "grace" or len(books) != 1:
        raise InvalidArgumentError(f"grace_without takes a GRACE edit with one codebook, got {e!r}")
    (book,) = books
    if isinstance(index, bool) or not 0 <= int(index) < len(book):
        raise IndexError(f"entry {index!r} is out of range: the codebook has {len(book)} entries")
    index = int(index)
    entry_of = list(e.metrics.get("entry_of_request", range(len(e.requests))))
    keep = [i for i, j in enumerate(entry_of) if j != index]
    new_entry_of = [entry_of[i] - (entry_of[i] > index) for i in keep]
    smaller = book.without(index)
    metrics = {**copy.deepcopy(e.metrics), "n_entries": len(smaller), "radii": smaller.radii.tolist(),
               "entry_of_request": new_entry_of, "removed_entry": index,
               "value_norms": smaller.values.norm(dim=-1).tolist()}
    for k in ("final_loss_per_request", "events"):
        if isinstance(metrics.get(k), list) and len(metrics[k]) == len(entry_of):
            metrics[k] = [metrics[k][i] for i in keep]
    interventions = [smaller if iv is book else iv for iv in e.interventions]
    return Edit("grace", [e.requests[i] for i in keep], interventions, e.fingerprint, e.model_name, e.layer_reason,
                copy.deepcopy(e.hparams), dict(e.timings), list(e.loss_trace), metrics,
                parents=list(e.parents), state=dict(e.state))


def grace(requests: Request | Sequence[Request], *, model=None, layer: Any = "auto", runtime: Runtime | None = None,
          **hparams) -> Edit:
    """The GRACE edit of ``requests`` at ``layer`` (one codebook, computed and **not applied**)."""
    return compute("grace", requests, model=model, runtime=runtime, layers=layer, **hparams)
