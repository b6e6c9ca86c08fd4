"""Knowledge-neuron edits (Dai et al. 2022, §5).

A knowledge neuron ``i`` of layer ``l`` writes its *value slot* into the residual stream: column ``i``
of :meth:`HookedLM.mlp_out_weight` in our (d_model, d_mlp) orientation (row ``i`` of a Hugging Face
``down_proj``/``c_proj``/``dense_4h_to_h`` read as (d_mlp, d_model)). The paper edits these slots only:

* **Updating a fact** ⟨h, r, t⟩ → ⟨h, r, t'⟩ (§5.1): every slot of the fact's knowledge neurons gets
  ``FFN_val_i ← FFN_val_i − λ₁·t + λ₂·t'`` where ``t`` and ``t'`` are the output (unembedding)
  embeddings of the old and new answers (their first token, as attribution uses).
* **Erasing a relation** (§5.2): the slots of the relation's knowledge neurons are set to 0.

Both return an :class:`edit.Edit` of rank ``k`` per layer, stored exactly as ``left @ right`` where
``right`` is the one-hot selection of the layer's ``k`` neurons (so applying adds exactly the
intended columns) and revertible bit-for-bit like every other edit.

Registered as ``kn``: the fact's neurons are found for ``target_true`` over the request's rendered
prompt and its paraphrases (``Request.paraphrases``; the evaluation harness passes a case's paraphrase
prompts) with :func:`locate.neurons`, refined as the authors' code does (shared by at least 3 prompts,
p adapted toward 2–5 neurons), and their slots rewritten toward ``target_new`` (§5.1). A request with
fewer than ``min_prompts`` prompts is refused (:class:`locate.neurons.TooFewPromptsError`) before any
work; ``min_prompts=1, adaptive=False`` is the single-prompt variant (every neuron of the one prompt
above ``threshold`` × max), e.g. for a request that has no paraphrases.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

from locate import neurons, resolve_model
from locate.errors import InvalidArgumentError
from locate.neurons import KnowledgeNeurons, NoNeuronsError, TooFewPromptsError, _by_layer

from ..edit import Edit, WeightDelta
from ..registry import Runtime, register
from ..request import InvalidRequestError, Request


def _slot_delta(lm, layer: int, idx: list[int], columns: torch.Tensor) -> WeightDelta:
    """A (d_model, d_mlp) delta that adds ``columns`` (d_model, k) to the slots ``idx`` of ``layer``."""
    select = torch.zeros(len(idx), lm.d_mlp, dtype=columns.dtype, device=columns.device)
    select[torch.arange(len(idx)), torch.tensor(idx)] = 1.0
    return WeightDelta(layer, left=columns, right=select)


def _neuron_list(kn) -> list[tuple[int, int]]:
    out = [tuple(int(x) for x in n) for n in kn]
    if not out:
        raise NoNeuronsError("no knowledge neurons to edit (refinement kept none: lower threshold or share)")
    return out


def _output_embedding(lm, target: str, prompt: str | None) -> torch.Tensor:
    """E(y): the unembedding row of the answer's first token, (d_model,)."""
    tok = lm.target_ids(target, prompt)[0]
    return lm.hf_model.get_output_embeddings().weight[tok].detach()


def _request(prompt: str | None, target_new: str, target_old: str | None) -> Request:
    # KN edits need no subject; record the fact's first prompt (as the "subject" of a "{}" template)
    # so that the Edit stays self-describing.
    return Request("{}", prompt or "", target_new, target_old)


@torch.no_grad()
def kn_update(kn: KnowledgeNeurons, target_new: str, *, target_old: str | None = None, lambda1: float = 1.0,
              lambda2: float = 8.0, model=None) -> Edit:
    """§5.1: update the fact behind ``kn`` so its answer becomes ``target_new``.

    Each knowledge neuron's value slot gets ``−λ₁·E(old) + λ₂·E(new)``; ``target_old`` defaults to
    the answer ``kn`` was found for. Returns an unapplied :class:`Edit` (``.apply()`` / ``applied``).
    """
    lm = resolve_model(model)
    neurons = _neuron_list(kn)
    prompt = kn.prompts[0] if isinstance(kn, KnowledgeNeurons) and kn.prompts else None
    target_old = target_old if target_old is not None else getattr(kn, "target", None)
    if target_old is None:
        raise InvalidArgumentError("target_old is needed when kn is a plain neuron list")
    t0 = time.perf_counter()
    e_old = _output_embedding(lm, target_old, prompt)
    e_new = _output_embedding(lm, target_new, prompt)
    slot_change = -lambda1 * e_old + lambda2 * e_new  # the same vector for every slot
    deltas = []
    for layer, idx in sorted(_by_layer(neurons).items()):
        lm.check_layer(layer)
        cols = slot_change[:, None].expand(-1, len(idx)).to(lm.dtype).clone()
        deltas.append(_slot_delta(lm, layer, idx, cols))
    return Edit("KN-update", [_request(prompt, target_new, target_old)], deltas, lm.fingerprint,
                lm.name, layer_reason="layers of the fact's knowledge neurons (integrated gradients, Dai et al. 2022)",
                hparams={"lambda1": lambda1, "lambda2": lambda2, "neurons": [list(n) for n in neurons]},
                timings={"compute_s": time.perf_counter() - t0})


@torch.no_grad()
def kn_erase(neurons: KnowledgeNeurons | Iterable[tuple[int, int]] | Sequence[KnowledgeNeurons], *,
             model=None, relation: str = "") -> Edit:
    """§5.2: erase a relation by zeroing the value slots of its knowledge neurons.

    ``neurons``: one :class:`KnowledgeNeurons`, a list of them (the union is erased: the relation's
    facts), or a plain list of (layer, index).
    """
    lm = resolve_model(model)
    items = list(neurons) if not isinstance(neurons, KnowledgeNeurons) else [neurons]
    if items and all(isinstance(x, KnowledgeNeurons) for x in items):
        flat = sorted({tuple(n) for k in items for n in k.neurons})
    else:
        flat = items
    flat = _neuron_list(flat)
    t0 = time.perf_counter()
    deltas = []
    for layer, idx in sorted(_by_layer(flat).items()):
        lm.check_layer(layer)
        W = lm.mlp_out_weight(layer)
        deltas.append(_slot_delta(lm, layer, idx, -W[:, idx].clone()))
    return Edit("KN-erase", [], deltas, lm.fingerprint,
                lm.name, layer_reason="layers of the relation's knowledge neurons",
                hparams={"relation": relation, "neurons": [list(n) for n in flat]},
                timings={"compute_s": time.perf_counter() - t0})


@dataclass
class KNHparams:
    """Dai et al. 2022's settings for finding and updating a fact's neurons (their code's refinement)."""

    steps: int = 20  # Riemann steps of integrated gradients
    threshold: float = 0.2  # per prompt, keep neurons with attribution ≥ threshold × that prompt's max
    share: float = 0.7  # starting p: keep neurons in ≥ max(p · N, min_prompts) of the N prompts
    min_prompts: int = 3  # a neuron is shared by at least this many prompts; fewer prompts are refused
    adaptive: bool = True  # move p by ±0.05 (at most 6 tries) until the fact has 2–5 neurons
    lambda1: float = 1.0  # weight of −E(old) in each slot update
    lambda2: float = 8.0  # weight of +E(new)


# smoke: the conformance requests carry no paraphrases, so the tests use the single-prompt variant
@register("kn", KNHparams, batched=False, layers=None, smoke={"steps": 2, "min_prompts": 1, "adaptive": False},
          description="knowledge-neuron edit: rewrite the value slots of the fact's neurons (Dai et al. 2022)")
def compute_kn(lm, requests: list[Request], hp: KNHparams, rt: Runtime) -> Edit:
    """Find the neurons of the old fact (``target_true`` after the rendered prompt and each of
    ``request.paraphrases``) and rewrite their value slots toward ``target_new``. Fewer than
    ``hp.min_prompts`` prompts raise :class:`TooFewPromptsError`. When the refinement keeps no neuron the
    edit is empty (the case is scored unedited) and says so in ``metrics``. ``hparams`` records the
    prompts used and the p the refinement ended at."""
    (request,) = requests
    if not request.target_true:
        raise InvalidRequestError(f"a knowledge-neuron edit needs the old answer (target_true) of {request!r}")
    prompts = [request.rendered, *request.paraphrases]
    if len(prompts) < hp.min_prompts:
        raise TooFewPromptsError(
            f"kn needs at least min_prompts={hp.min_prompts} prompts of the fact (Dai et al. keep neurons shared "
            f"by at least 3), but {request!r} has {len(prompts)}: its rendered prompt and {len(request.paraphrases)} "
            "paraphrase(s). Pass paraphrases (Request.paraphrases; the harness passes a case's paraphrase "
            "prompts), or set min_prompts=1, adaptive=False to edit from the single prompt")
    found = neurons(prompts, request.target_true, model=lm, steps=hp.steps, threshold=hp.threshold,
                    share=hp.share, min_prompts=hp.min_prompts, adaptive=hp.adaptive, progress=False)
    try:
        e = kn_update(found, request.target_new, target_old=request.target_true, lambda1=hp.lambda1,
                      lambda2=hp.lambda2, model=lm)
    except NoNeuronsError:
        e = Edit("kn", [request], [], lm.fingerprint, lm.name, metrics={"n_neurons": 0})
    e.method, e.requests = "kn", [request]
    e.hparams = {**asdict(hp), **e.hparams, "prompts": found.prompts, "share_used": found.params["share_used"]}
    e.metrics.setdefault("n_neurons", sum(d.rank or 0 for d in e.deltas))
    return e
