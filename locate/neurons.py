"""Knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers").

A *neuron* is one coordinate of an MLP's intermediate activation, the MLP key
(:meth:`HookedLM.hook_mlp_key`): ``d_mlp`` neurons per layer. For a prompt ``x`` whose answer is ``y``,
the attribution of neuron ``i`` of layer ``l`` is its integrated gradient (Dai et al., Eq. 3)::

    Attr(w_i^l) = w̄_i^l · ∫₀¹ ∂P_x(α · w̄_i^l) / ∂w_i^l  dα                      (Eq. 3)

where ``w̄_i^l`` is the neuron's activation on ``x`` at the answer position (for a causal LM: the
last prompt position) and ``P_x(ŵ)`` is the model's probability of ``y`` when layer ``l``'s
activations at that position are set to ``ŵ`` and every other layer runs clean. The integral is a
Riemann sum over ``m`` steps (Eq. 4), with the ``α_k = k/m, k = 0..m-1`` points of the authors' code::

    Attr ≈ (w̄ / m) · Σ_{k=0}^{m-1} ∂P_x(k/m · w̄) / ∂w                         (Eq. 4)

Scaling a whole layer at once and reading the gradient of every neuron of that layer is what the
paper does; layers are scaled one at a time. We compute all layers in a few batched backward passes:
a batch of ``layers × steps`` rows, where the rows assigned to layer ``l`` get layer ``l``'s activation
replaced by ``α_k · w̄^l`` (a leaf tensor) and run every other layer clean. Rows do not interact, so
one backward of ``Σ_rows P`` gives each row's own gradient. Only the last position is scaled, so a
row runs the last token alone on the clean run's key/value cache of the earlier positions, from the
lowest scaled layer of its batch up (the blocks below are clean and skipped).
:func:`attribution_loop` is the plain per-layer, per-step loop, kept as the reference.

Refinement (§3.2), in the order of the authors' code (``2_analyze_kn.py``), for a fact with N prompts::

    coarse_j = {(l, i) : Attr_j(w_i^l) ≥ t · max Attr_j}                 t = 0.2, per prompt j
    refined  = {(l, i) : #{j : (l, i) ∈ coarse_j} ≥ max(p · N, 3)}      p = 0.7 to start

then p moves by 0.05 (down when fewer than 2 neurons remain, up when more than 5) and the fact is
refined again, until it has 2–5 neurons or 6 p's were tried (the last then stands). A neuron must be
shared by at least 3 prompts, so a fact with fewer prompts is refused (:class:`TooFewPromptsError`).
In the authors' code the adaptive p is shared by a relation's facts and aims at their mean count:
:func:`refine_facts`; :func:`refine` is the one-fact case. ``min_prompts`` (the 3) and ``adaptive``
are options; ``min_prompts=1, adaptive=False`` is the plain fixed-p rule. Optionally drop the neurons
shared with other relations' facts. :func:`neurons` does all of it and returns :class:`KnowledgeNeurons`.

Verification (§4): :func:`suppress` sets the neurons to 0, :func:`amplify` multiplies them (×2);
:func:`verify_neurons` reports the change in P(answer) under both, against random neuron sets of
equal size drawn from the same layers.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from ._io import read_json, write_json
from .errors import EmptyTargetError, InvalidArgumentError, InvalidHparamsError, LocateEditError
from .hooks import as_cache, capture, prefix_cache
from .model import resolve_model

Neuron = tuple[int, int]  # (layer, index)


class NoNeuronsError(LocateEditError, ValueError):
    """An empty neuron set where one is needed (e.g. verifying or editing no neurons)."""


class AttributionShapeError(LocateEditError, ValueError):
    """Attributions that are not one (n_prompts, n_layers, d_mlp) tensor per fact."""


class TooFewPromptsError(LocateEditError, ValueError):
    """A fact with fewer prompts than a neuron must be shared by (``min_prompts``): the share filter
    could keep no neuron, so the fact is refused instead of refined to nothing (or edited on one prompt)."""


# ---------------------------------------------------------------------------------------- plumbing
def _as_prompts(prompts: str | Sequence[str]) -> list[str]:
    out = [prompts] if isinstance(prompts, str) else list(prompts)
    if not out or any(not isinstance(p, str) or not p.strip() for p in out):
        raise EmptyTargetError("prompts must be a non-empty list of non-empty strings")
    return out


def _last_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) at the last position of unpadded rows ``ids`` (B, T).

    Calls the Hugging Face model (whose modules the bridge has wrapped, so TransformerLens hooks fire)
    with ``logits_to_keep=1``: the unembedding runs on the last position only, which keeps a batch
    of hundreds of rows affordable.
    """
    try:
        return lm.hf_model(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]
    except TypeError:  # pragma: no cover - a model without logits_to_keep
        return lm.bridge(ids)[:, -1]


def _answer_steps(lm, prompt: str, target: str, tokens: str) -> list[tuple[list[int], int]]:
    """(input ids, answer id) for each answer token to attribute: the first only ("first", as the
    paper does), or each token after the prompt plus the answer's earlier tokens ("mean")."""
    if tokens not in ("first", "mean"):
        raise InvalidArgumentError(f"tokens must be 'first' or 'mean', got {tokens!r}")
    ids, ans = lm.encode(prompt), lm.target_ids(target, prompt)
    n = 1 if tokens == "first" else len(ans)
    return [(ids + ans[:j], ans[j]) for j in range(n)]


@torch.no_grad()
def _clean_keys(lm, ids: list[int], layers: Sequence[int]) -> torch.Tensor:
    """w̄: the MLP keys of ``layers`` at the last position, shape (len(layers), d_mlp)."""
    return _clean_run(lm, ids, layers)[0]


@torch.no_grad()
def _clean_run(lm, ids: list[int], layers: Sequence[int]):
    """One clean forward of ``ids``: the MLP keys w̄ of ``layers`` at the last position (len(layers),
    d_mlp), every block's input at the last position {layer: (d_model,)}, and the key/value cache of
    the positions before the last (None for a one-token prompt)."""
    key_sites = {lm.hook_mlp_key(l): i for i, l in enumerate(layers)}
    resid_sites = {lm.hook_resid_pre(l): l for l in range(lm.n_layers)}
    with capture(lm, [*key_sites, *resid_sites], keep=lambda name, a: a[0, -1].clone(), stop=False) as got:
        _, kv = prefix_cache(lm, torch.tensor([ids], device=lm.device))
    keys = torch.stack([got[name].to(lm.device) for name in key_sites]).to(lm.dtype)  # layers may sit on several devices
    resid = {l: got[name] for name, l in resid_sites.items()}
    prefix = [(k[:, :, :-1], v[:, :, :-1]) for k, v in kv] if len(ids) > 1 else None
    return keys, resid, prefix


def _acc_dtype(lm) -> torch.dtype:
    """float32, or the model's dtype when that is wider (float64 models stay exact)."""
    return torch.promote_types(lm.dtype, torch.float32)


def _alphas(steps: int, device, dtype) -> torch.Tensor:
    """Riemann points α_k = k/m, k = 0..m-1 (Eq. 4, as in the authors' code)."""
    return torch.arange(steps, device=device, dtype=dtype) / steps


# ---------------------------------------------------------------------------------------- attribution
def attribution(lm, prompt: str, target: str, *, steps: int = 20, layers: Sequence[int] | None = None,
                tokens: str = "first", batch_size: int = 200, progress: bool = False,
                precision: torch.dtype | str | None = None) -> torch.Tensor:
    """Integrated-gradients attribution (Eq. 4) of every neuron in ``layers`` (default all), shape
    (n_layers, d_mlp); rows of layers not requested are zero.

    Batched: the ``len(layers) × steps`` scaled copies of the prompt's last token run ``batch_size``
    rows at a time (rounded to whole layers) on the clean run's cached prefix, each chunk one forward
    and one backward.

    ``precision=torch.float64`` runs the model in float64 for the call (weights restored bit-exactly
    after). In float32 the batched and loop paths round differently (different matmul shapes), so
    they agree to ~2e-4 of the largest attribution, each ~5e-5 from the float64 value; in float64 they
    agree to ~1e-9 of it on the default model (bench/neurons_bench.py).
    """
    layers = list(range(lm.n_layers)) if layers is None else [lm.check_layer(l) for l in layers]
    per_chunk = max(1, batch_size // steps)
    chunks = [layers[i: i + per_chunk] for i in range(0, len(layers), per_chunk)]
    todo = _answer_steps(lm, prompt, target, tokens)
    bar = tqdm(total=len(todo) * len(chunks), desc="knowledge neurons", disable=not progress, leave=False)
    with lm.precision(precision), lm.eval_mode():
        attr = torch.zeros(lm.n_layers, lm.d_mlp, device=lm.device, dtype=_acc_dtype(lm))
        for ids, answer in todo:
            w_bar, resid, prefix = _clean_run(lm, ids, layers)  # w̄: (L, d_mlp)
            alphas = _alphas(steps, lm.device, lm.dtype)
            row_of = {l: i for i, l in enumerate(layers)}
            for chunk in chunks:
                # scaled[j, k] = α_k · w̄^{chunk[j]}: the leaf whose gradient is ∂P/∂w for each row
                wb = w_bar[[row_of[l] for l in chunk]]
                scaled = (alphas[None, :, None] * wb[:, None, :]).requires_grad_(True)
                n_rows = len(chunk) * steps

                def make_hook(j):
                    def hook(act, hook):
                        act = act.clone()
                        act[j * steps:(j + 1) * steps, -1] = scaled[j].to(act.device)
                        return act
                    return hook

                # Only the last position is scaled, so the earlier positions are the clean run's: they
                # come from its key/value cache and each row runs the last token alone. Blocks below
                # the chunk's lowest layer are clean too: they are skipped and the lowest gets the clean
                # residual (exact; tests hold this equal to the full-prompt loop).
                j0 = min(chunk)
                cache = None if prefix is None else as_cache(
                    [(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1)) for k, v in prefix])
                last = torch.full((n_rows, 1), ids[-1], device=lm.device)
                with lm.hooks([(lm.hook_mlp_key(l), make_hook(j)) for j, l in enumerate(chunk)]), \
                        lm.start_at_block(j0, resid[j0].expand(n_rows, 1, -1)):
                    logits = lm.hf_model(input_ids=last, past_key_values=cache, use_cache=cache is not None,
                                         logits_to_keep=1).logits[:, -1]
                probs = logits.to(_acc_dtype(lm)).softmax(-1)[:, answer]
                (grad,) = torch.autograd.grad(probs.sum(), scaled)
                # Eq. 4: w̄ · mean_k ∂P(α_k w̄)/∂w
                attr[chunk] += (wb.to(attr.dtype) * grad.to(attr.dtype).mean(1)) / len(todo)
                bar.update(1)
    bar.close()
    return attr


def attribution_loop(lm, prompt: str, target: str, *, steps: int = 20, layers: Sequence[int] | None = None,
                     tokens: str = "first", precision: torch.dtype | str | None = None) -> torch.Tensor:
    """Reference implementation of :func:`attribution`: for each layer, for each Riemann step, one
    forward and one backward of the single prompt (``n_layers × steps`` passes), as common
    implementations do. Slow; used by the tests and the benchmark."""
    layers = list(range(lm.n_layers)) if layers is None else [lm.check_layer(l) for l in layers]
    todo = _answer_steps(lm, prompt, target, tokens)
    with lm.precision(precision), lm.eval_mode():
        attr = torch.zeros(lm.n_layers, lm.d_mlp, device=lm.device, dtype=_acc_dtype(lm))
        for ids, answer in todo:
            w_bar = _clean_keys(lm, ids, layers)
            x = torch.tensor([ids], device=lm.device)
            for i, l in enumerate(layers):
                total = torch.zeros(lm.d_mlp, device=lm.device, dtype=_acc_dtype(lm))
                for alpha in _alphas(steps, lm.device, lm.dtype):
                    w = (alpha * w_bar[i]).requires_grad_(True)

                    def hook(act, hook, w=w):
                        act = act.clone()
                        act[0, -1] = w.to(act.device)
                        return act

                    with lm.hooks([(lm.hook_mlp_key(l), hook)]):
                        p = _last_logits(lm, x).to(_acc_dtype(lm)).softmax(-1)[0, answer]
                    (g,) = torch.autograd.grad(p, w)
                    total += g.to(total.dtype)
                attr[l] += w_bar[i].to(total.dtype) * total / steps / len(todo)
    return attr


# ---------------------------------------------------------------------------------------- result
@dataclass
class KnowledgeNeurons:
    """The knowledge neurons of one fact: ``neurons`` as (layer, index), plus the evidence.

    ``per_prompt`` holds each prompt's attribution map (n_layers, d_mlp); ``layer_maps`` is their mean
    (the per-layer attribution map); ``coarse`` the per-prompt neuron sets before the share filter.
    """

    prompts: list[str]
    target: str
    neurons: list[Neuron]
    per_prompt: torch.Tensor  # (n_prompts, n_layers, d_mlp)
    coarse: list[list[Neuron]] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    model_name: str = ""
    fingerprint: str = ""

    @property
    def layer_maps(self) -> torch.Tensor:
        """Mean attribution over prompts, (n_layers, d_mlp)."""
        return self.per_prompt.mean(0)

    @property
    def per_layer(self) -> torch.Tensor:
        """Total positive attribution per layer (n_layers,), as in the paper's layer histograms."""
        return self.layer_maps.clamp(min=0).sum(1)

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.neurons})

    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(self.neurons)

    def __repr__(self) -> str:
        shown = ", ".join(f"L{l}.{i}" for l, i in self.neurons[:8])
        more = f", +{len(self.neurons) - 8}" if len(self.neurons) > 8 else ""
        return f"KnowledgeNeurons({self.target!r}, {len(self.prompts)} prompts, [{shown}{more}])"

    def without(self, *others: "KnowledgeNeurons | Iterable[Neuron]") -> "KnowledgeNeurons":
        """A copy without the neurons that also belong to ``others`` (e.g. other relations' facts)."""
        drop = {tuple(n) for o in others for n in o}
        return KnowledgeNeurons(self.prompts, self.target, [n for n in self.neurons if n not in drop],
                                self.per_prompt, self.coarse, {**self.params, "excluded": len(drop)},
                                self.model_name, self.fingerprint)

    def to_dict(self) -> dict:
        return {"format": "locate-edit/neurons/1", "prompts": self.prompts, "target": self.target,
                "neurons": [list(n) for n in self.neurons], "coarse": [[list(n) for n in c] for c in self.coarse],
                "params": self.params, "model_name": self.model_name, "fingerprint": self.fingerprint,
                "per_prompt": self.per_prompt.cpu().tolist()}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "KnowledgeNeurons":
        d = read_json(path, "knowledge-neurons")
        return cls(d["prompts"], d["target"], [tuple(n) for n in d["neurons"]], torch.tensor(d["per_prompt"]),
                   [[tuple(n) for n in c] for c in d.get("coarse", [])], d.get("params", {}),
                   d.get("model_name", ""), d.get("fingerprint", ""))


class Refinement(NamedTuple):
    """The refinement of one fact (§3.2).

    ``neurons``: the refined set; ``coarse``: each prompt's set before the share filter; ``share``: the
    p the refined set was filtered with; ``tried``: every p evaluated, in order (one unless adaptive).
    """

    neurons: list[Neuron]
    coarse: list[list[Neuron]]
    share: float
    tried: list[float]


def _check_refine_args(threshold: float, share: float, min_prompts: int, aim: tuple[float, float], step: float,
                       rounds: int) -> None:
    if not 0 < share <= 1 or not 0 <= threshold < 1:
        raise InvalidHparamsError(f"need 0 < share <= 1 and 0 <= threshold < 1, got share={share}, threshold={threshold}")
    if int(min_prompts) != min_prompts or min_prompts < 1:
        raise InvalidHparamsError(f"min_prompts must be a positive integer, got {min_prompts!r}")
    if len(aim) != 2 or not 0 <= aim[0] <= aim[1] or step < 0 or int(rounds) != rounds or rounds < 1:
        raise InvalidHparamsError(f"need aim = (lo, hi) with 0 <= lo <= hi, step >= 0 and rounds >= 1, "
                                  f"got aim={aim!r}, step={step}, rounds={rounds}")


def _too_few(n: int, min_prompts: int, what: str) -> TooFewPromptsError:
    return TooFewPromptsError(
        f"{what} has {n} prompt(s), but a knowledge neuron must be shared by at least {min_prompts} prompts "
        f"(Dai et al.'s rule): give at least {min_prompts} paraphrases of the fact, or lower min_prompts "
        f"(min_prompts=1 keeps every neuron of a single prompt above threshold × max)")


def coarse_sets(per_prompt: torch.Tensor, threshold: float = 0.2) -> list[list[Neuron]]:
    """Step 1 of the refinement: for each prompt, the neurons whose attribution is at least ``threshold``
    × that prompt's largest attribution (over all layers), "≥" as in the authors' code. A prompt whose
    largest attribution is not positive keeps none (their code would keep every zero attribution when
    the max is 0)."""
    out = []
    for a in per_prompt:
        top = a.max()
        keep = (a >= threshold * top).nonzero().tolist() if top > 0 else []
        out.append([tuple(n) for n in keep])
    return out


def share_filter(coarse: Sequence[Sequence[Neuron]], share: float, min_prompts: int = 3) -> list[Neuron]:
    """Step 2: the neurons found in at least ``max(p · N, min_prompts)`` of the ``N`` prompts' coarse sets.

    p · N is compared exactly. (The authors' code adds 0.05 to p in floating point, so at p = 0.9 it
    asks 10 prompts of 10 where 9 is p · N; rounding only ever matters when p · N is a whole number.)"""
    counts = Counter(n for c in coarse for n in c)
    need = max(share * len(coarse), min_prompts)
    return sorted(n for n, k in counts.items() if k >= need - 1e-9)  # p·N exact, not its float rounding


def refine_facts(per_fact: Sequence[torch.Tensor], *, threshold: float = 0.2, share: float = 0.7,
                 min_prompts: int = 3, adaptive: bool = True, aim: tuple[float, float] = (2, 5), step: float = 0.05,
                 rounds: int = 6) -> list[Refinement]:
    """§3.2 refinement of several facts (e.g. one relation's) with one share p, as the authors' code runs it.

    Each fact is a (n_prompts, n_layers, d_mlp) attribution tensor. For p = ``share``:

    1. coarse sets (:func:`coarse_sets`): per prompt, attribution ≥ ``threshold`` × its max;
    2. share filter (:func:`share_filter`): neurons in ≥ max(p · N, ``min_prompts``) of the fact's N prompts;
    3. adaptive p (``adaptive=True``): if the mean number of refined neurons per fact is below ``aim[0]``,
       p ← p − ``step``; above ``aim[1]``, p ← p + ``step``; and refine again. It stops at the first p whose
       mean lies in ``aim`` (bounds included) or after ``rounds`` evaluations; then the last evaluation
       stands, even outside ``aim`` (with the defaults p ends within 0.7 ± 0.25).

    A fact with fewer than ``min_prompts`` prompts is refused (:class:`TooFewPromptsError`). For one fact
    the mean is that fact's own count. ``min_prompts=1, adaptive=False`` is the plain rule (neurons in ≥
    p · N prompts at the fixed p), which on a single prompt keeps its whole coarse set.
    """
    _check_refine_args(threshold, share, min_prompts, aim, step, rounds)
    if not per_fact:
        raise EmptyTargetError("no facts to refine")
    for i, per in enumerate(per_fact):
        if per.ndim != 3:
            raise AttributionShapeError(f"fact {i}: attributions must be (n_prompts, n_layers, d_mlp), got shape {tuple(per.shape)}")
        if per.shape[0] < min_prompts:
            raise _too_few(per.shape[0], min_prompts, f"fact {i}")
    coarse = [coarse_sets(per, threshold) for per in per_fact]
    k, tried = 0, []
    while True:
        p = round(share + k * step, 10)  # p = share ± k · step
        tried.append(p)
        kept = [share_filter(c, p, min_prompts) for c in coarse]
        mean = sum(len(n) for n in kept) / len(kept)
        if not adaptive or aim[0] <= mean <= aim[1] or len(tried) == rounds:
            break
        k += -1 if mean < aim[0] else 1
    return [Refinement(n, c, p, list(tried)) for n, c in zip(kept, coarse)]


def refine(per_prompt: torch.Tensor, *, threshold: float = 0.2, share: float = 0.7, min_prompts: int = 3,
           adaptive: bool = True, aim: tuple[float, float] = (2, 5), step: float = 0.05, rounds: int = 6
           ) -> Refinement:
    """§3.2 refinement of one fact's (n_prompts, n_layers, d_mlp) attributions: :func:`refine_facts` on
    that fact alone, so the adaptive p aims at 2–5 neurons for this fact. See there for the options."""
    return refine_facts([per_prompt], threshold=threshold, share=share, min_prompts=min_prompts,
                        adaptive=adaptive, aim=aim, step=step, rounds=rounds)[0]


def neurons(prompts: str | Sequence[str], target: str, *, model=None, steps: int = 20, threshold: float = 0.2,
            share: float = 0.7, min_prompts: int = 3, adaptive: bool = True, tokens: str = "first",
            layers: Sequence[int] | None = None, exclude: Iterable[KnowledgeNeurons | Iterable[Neuron]] = (),
            batch_size: int = 200, progress: bool = True, precision: torch.dtype | str | None = None
            ) -> KnowledgeNeurons:
    """Find the knowledge neurons of the fact "``prompts`` → ``target``" (Dai et al. 2022).

    ``prompts`` are paraphrases stating the same fact, each ending where ``target`` follows; the
    refinement (:func:`refine`) keeps the neurons above ``threshold`` × max in at least max(``share`` ·
    N, ``min_prompts``) of them, adapting ``share`` in steps of 0.05 toward 2–5 neurons when
    ``adaptive``. Fewer than ``min_prompts`` prompts (default 3) raise :class:`TooFewPromptsError`
    before any work; ``min_prompts=1, adaptive=False`` is the plain fixed-p rule (one prompt: its whole
    coarse set). ``params`` records the p used (``share_used``) and every p tried.

    ``tokens="first"`` attributes the first answer token (the paper); ``"mean"`` averages over the
    answer's tokens. ``exclude``: neuron sets of other relations' facts to remove from the result.
    ``precision``: e.g. ``torch.float64`` to compute the attributions in float64 (see :func:`attribution`).
    """
    lm = resolve_model(model)
    prompts = _as_prompts(prompts)
    for p in prompts:  # validate everything before running anything
        lm.target_ids(target, p)
    if layers is not None:
        layers = [lm.check_layer(l) for l in layers]
    _check_refine_args(threshold, share, min_prompts, (2, 5), 0.05, 6)
    if len(prompts) < min_prompts:
        raise _too_few(len(prompts), min_prompts, f"the fact -> {target!r}")
    per_prompt = torch.stack([
        attribution(lm, p, target, steps=steps, layers=layers, tokens=tokens, batch_size=batch_size,
                    progress=progress, precision=precision) for p in prompts]).cpu()
    r = refine(per_prompt, threshold=threshold, share=share, min_prompts=min_prompts, adaptive=adaptive)
    kn = KnowledgeNeurons(prompts, target, r.neurons, per_prompt, r.coarse,
                          dict(steps=steps, threshold=threshold, share=share, share_used=r.share, shares_tried=r.tried,
                               min_prompts=min_prompts, adaptive=adaptive, tokens=tokens,
                               precision=str(precision or lm.dtype).replace("torch.", "")), lm.name, lm.fingerprint)
    exclude = list(exclude)
    return kn.without(*exclude) if exclude else kn


# ---------------------------------------------------------------------------------------- interventions
def _by_layer(neuron_set) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for l, i in neuron_set:
        out.setdefault(int(l), []).append(int(i))
    return out


@contextlib.contextmanager
def _scaled(neuron_set, factor: float, model=None, positions: str = "last"):
    lm = resolve_model(model)
    if positions not in ("last", "all"):
        raise InvalidArgumentError(f"positions must be 'last' or 'all', got {positions!r}")
    groups = _by_layer(neuron_set)
    for l in groups:
        lm.check_layer(l)
        if any(not 0 <= i < lm.d_mlp for i in groups[l]):
            raise IndexError(f"neuron index out of range for d_mlp={lm.d_mlp} at layer {l}")
    pos = slice(-1, None) if positions == "last" else slice(None)

    def make(l, idx):
        idx_t = torch.tensor(idx, device=lm.layer_device(l))

        def hook(act, hook):
            act = act.clone()
            act[:, pos, idx_t] = act[:, pos, idx_t] * factor
            return act
        return hook

    with lm.hooks([(lm.hook_mlp_key(l), make(l, idx)) for l, idx in groups.items()]):
        yield lm


def suppress(neuron_set, *, model=None, positions: str = "last"):
    """Context: the neurons' activations set to 0 (§4.1). ``positions="last"`` acts on the last
    position of every row (the answer position, as the paper acts on [MASK]; run unpadded or
    left-padded prompts), ``"all"`` on every position."""
    return _scaled(neuron_set, 0.0, model, positions)


def amplify(neuron_set, factor: float = 2.0, *, model=None, positions: str = "last"):
    """Context: the neurons' activations multiplied by ``factor`` (§4.1 doubles them)."""
    return _scaled(neuron_set, factor, model, positions)


@dataclass
class Verification:
    """ΔP(answer) under suppress/amplify for the fact's prompts, and for random control sets.

    ``*_rel`` are relative changes (P' − P) / P averaged over prompts, as the paper reports them.
    """

    target: str
    n_neurons: int
    p_base: list[float]
    p_suppress: list[float]
    p_amplify: list[float]
    random_suppress: list[list[float]]  # [trial][prompt]
    random_amplify: list[list[float]]

    @staticmethod
    def _rel(new, base):
        return sum((n - b) / b for n, b in zip(new, base)) / len(base)

    @property
    def suppress_rel(self) -> float:
        return self._rel(self.p_suppress, self.p_base)

    @property
    def amplify_rel(self) -> float:
        return self._rel(self.p_amplify, self.p_base)

    @property
    def random_suppress_rel(self) -> float:
        return sum(self._rel(t, self.p_base) for t in self.random_suppress) / max(1, len(self.random_suppress))

    @property
    def random_amplify_rel(self) -> float:
        return sum(self._rel(t, self.p_base) for t in self.random_amplify) / max(1, len(self.random_amplify))

    def summary(self) -> dict:
        return {"target": self.target, "n_neurons": self.n_neurons, "suppress_rel": self.suppress_rel,
                "random_suppress_rel": self.random_suppress_rel, "amplify_rel": self.amplify_rel,
                "random_amplify_rel": self.random_amplify_rel}

    def to_dict(self) -> dict:
        return {**asdict(self), **self.summary()}

    def __repr__(self) -> str:
        s = self.summary()
        return (f"Verification({self.target!r}, {self.n_neurons} neurons: suppress {s['suppress_rel']:+.1%} "
                f"(random {s['random_suppress_rel']:+.1%}), amplify {s['amplify_rel']:+.1%} "
                f"(random {s['random_amplify_rel']:+.1%}))")


def random_like(neuron_set, d_mlp: int, rng: random.Random) -> list[Neuron]:
    """As many random neurons per layer as ``neuron_set`` has there, avoiding its own neurons."""
    out = []
    for l, idx in _by_layer(neuron_set).items():
        pool = sorted(set(range(d_mlp)) - set(idx))
        out += [(l, i) for i in rng.sample(pool, len(idx))]
    return out


@torch.no_grad()
def _answer_probs(lm, prompts: Sequence[str], target: str) -> list[float]:
    out = []
    for p in prompts:  # one at a time: unpadded, so "last" is each prompt's answer position
        ids = torch.tensor([lm.encode(p)], device=lm.device)
        out.append(float(_last_logits(lm, ids).to(_acc_dtype(lm)).softmax(-1)[0, lm.target_ids(target, p)[0]]))
    return out


def verify_neurons(kn: KnowledgeNeurons | Iterable[Neuron], prompts: Sequence[str] | None = None,
                   target: str | None = None, *, model=None, factor: float = 2.0, n_random: int = 5,
                   seed: int = 0, positions: str = "last") -> Verification:
    """§4.1: P(first answer token) for each prompt, clean, with the neurons suppressed, and amplified
    by ``factor``; the same for ``n_random`` random sets of equal size from the same layers."""
    lm = resolve_model(model)
    if isinstance(kn, KnowledgeNeurons):
        prompts = kn.prompts if prompts is None else prompts
        target = kn.target if target is None else target
    neuron_set = [tuple(n) for n in kn]
    if not neuron_set:
        raise NoNeuronsError("no neurons to verify (refinement kept none: lower threshold or share)")
    if prompts is None or target is None:
        raise InvalidArgumentError("give prompts and target, or a KnowledgeNeurons")
    prompts = _as_prompts(prompts)
    for p in prompts:
        lm.target_ids(target, p)
    base = _answer_probs(lm, prompts, target)
    with suppress(neuron_set, model=lm, positions=positions):
        sup = _answer_probs(lm, prompts, target)
    with amplify(neuron_set, factor, model=lm, positions=positions):
        amp = _answer_probs(lm, prompts, target)
    rng = random.Random(seed)
    rs, ra = [], []
    for _ in range(n_random):
        ctrl = random_like(neuron_set, lm.d_mlp, rng)
        with suppress(ctrl, model=lm, positions=positions):
            rs.append(_answer_probs(lm, prompts, target))
        with amplify(ctrl, factor, model=lm, positions=positions):
            ra.append(_answer_probs(lm, prompts, target))
    return Verification(target, len(neuron_set), base, sup, amp, rs, ra)
