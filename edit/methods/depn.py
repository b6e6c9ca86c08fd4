"""DEPN: detect the neurons behind memorised private strings and erase them (Wu et al. 2023,
"DEPN: Detecting and Editing Privacy Neurons in Pretrained Language Models", EMNLP; authors' code
``flamewei123/DEPN``).

Three steps, over a batch of samples j = 1..N, each a context x_j and the private string
Y_j = (y_1 .. y_|Y|) the model leaks after it:

1. **Privacy neuron detector** (eq. 3-4). The integrated-gradients attribution of every MLP neuron
   w_i^l (Dai et al.'s knowledge-neuron attribution, :func:`locate.neurons.attribution`, reused),
   summed over the private string's tokens:

       Att_j(w_i^l) = Σ_t  w̄_i^l · (1/m) Σ_{k=0}^{m-1} ∂P(y_t | x_j, y_<t; α_k w̄_i^l) / ∂w_i^l,     α_k = k/m

   (the authors' BERT masks one token of the secret at a time; a causal LM reads y_t after x_j and
   y_<t, teacher-forced: ``tokens="mean"`` of the attribution, whose mean differs from the sum only
   by the factor |Y|, which the relative threshold below ignores). The sample's privacy neurons are
   those with Att_j ≥ t · max Att_j (t = 0.1; a sample whose largest attribution is not positive has
   none).
2. **Privacy neuron aggregator.** Count in how many samples each neuron is a privacy neuron and keep
   the z most frequent (ties in order of first appearance: sample order, then layer and index), as the
   authors' editor does (``Counter.most_common(erase_kn_num)``).
3. **Privacy editor.** Set the z neurons' activations to zero, for every input: their value slots
   (columns of the MLP output weight) are zeroed, an exact weight edit
   (:func:`edit.methods.kn.kn_erase`, reused) that reverts bit-for-bit.

Defaults from the authors' scripts: m = 20 steps (``1_run_detector.sh``: 20 × 1 batch), t = 0.1
(``convert_to_triplet_ig``), z = 20 (``3_run_editor.sh``; their README suggests 10-200 for phone numbers
and names). Their filter script's second threshold (0.01, below 0.1, so no-op) and its per-bag mode
filter (one attribution per bag, so no-op) are not repeated. For names and random text their editor
writes BERT's [UNK] embedding into the slots instead of zeros; the paper and their phone-number path
zero them, which is what this does.

Requests.  The private string is ``Request.target_true``: the continuation the model leaks after the
rendered prompt and should stop producing. ``target_new`` is not used (DEPN writes nothing in its
place); a request without ``target_true`` is refused (:class:`MissingPrivateStringError`).

**Substitute data.** The paper's setting is BERT fine-tuned on the Enron e-mails, erasing the phone
numbers, names and random texts it memorised. That data could not be obtained. The toolkit applies
DEPN to information the default model demonstrably memorises instead: known_1000 facts whose answer the
model completes verbatim (greedy, every token top-1; :func:`memorised_known`). These are public facts,
not private data, and a pretrained model's knowledge of them is spread more widely than one fine-tuned
e-mail's phone number: read the numbers as a stand-in for the paper's setting, not a reproduction.

Metrics (:func:`leak`, :func:`depn_report`): per private string, its probability as a whole
continuation and each token's rank (1 = the top prediction), the mean reciprocal rank of its tokens
(the authors' metric for names) and whether greedy decoding still reproduces it verbatim; before and
after the edit. Locality: on unrelated facts, whether the model's top-1 continuation is unchanged and
how much the probability of their answer moves.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from locate import resolve_model
from locate.errors import InvalidHparamsError
from locate.neurons import Neuron, NoNeuronsError, attribution, coarse_sets

from ..edit import Edit, applied
from ..eval.datasets import load_known
from ..registry import Runtime, register
from ..request import InvalidRequestError, Request
from .kn import kn_erase


class MissingPrivateStringError(InvalidRequestError):
    """A DEPN request without ``target_true``, the private string to erase."""


@dataclass
class DEPNHparams:
    """DEPN's settings (the authors' scripts; module docstring)."""

    steps: int = 20  # m, Riemann steps of the integrated gradients (eq. 4)
    threshold: float = 0.1  # t: a sample's privacy neurons have Att ≥ t · its max Att
    n_neurons: int = 20  # z: the most frequent privacy neurons over the batch, erased
    tokens: str = "all"  # "all": attribute every token of the private string (summed); "first": its first only
    batch_size: int = 200  # rows per attribution forward (locate.neurons.attribution)

    def __post_init__(self):
        if self.steps < 1 or self.n_neurons < 1 or not 0 <= self.threshold < 1:
            raise InvalidHparamsError(f"need steps >= 1, n_neurons >= 1 and 0 <= threshold < 1; got steps={self.steps}, "
                                      f"n_neurons={self.n_neurons}, threshold={self.threshold}")
        if self.tokens not in ("all", "first"):
            raise InvalidHparamsError(f"tokens must be 'all' or 'first', got {self.tokens!r}")


def _private(r: Request) -> str:
    if not r.target_true or not r.target_true.strip():
        raise MissingPrivateStringError(
            f"DEPN erases the string the model leaks after the prompt, given as target_true; {r!r} has none")
    return r.target_true


def detect(lm, prompt: str, private: str, hp: DEPNHparams) -> torch.Tensor:
    """Step 1: Att_j for every neuron, (n_layers, d_mlp), on the private string's tokens (``hp.tokens``)."""
    return attribution(lm, prompt, private, steps=hp.steps, tokens="mean" if hp.tokens == "all" else "first",
                       batch_size=hp.batch_size)


def aggregate(per_sample: Sequence[torch.Tensor], threshold: float, z: int) -> tuple[list[Neuron], Counter]:
    """Steps 1-2 on the attributions: each sample's privacy neurons (Att ≥ ``threshold`` × its max), then
    the ``z`` neurons that are privacy neurons of the most samples, ties in order of first appearance.
    Returns the neurons and the counts."""
    sets = coarse_sets(torch.stack([a.float().cpu() for a in per_sample]), threshold)
    counts = Counter(n for s in sets for n in s)  # insertion order = first appearance
    return [n for n, _ in counts.most_common(z)], counts


@register("depn", DEPNHparams, batched=True, layers=None, smoke={"steps": 2, "n_neurons": 5},
          description="DEPN: erase the neurons most often attributed to memorised private strings (Wu et al. 2023)")
def compute_depn(lm, requests: list[Request], hp: DEPNHparams, rt: Runtime) -> Edit:
    """Detect each request's privacy neurons for its private string (``target_true`` after the rendered
    prompt), aggregate them over the batch and zero the ``n_neurons`` most frequent ones' value slots
    (not applied). ``metrics``: the number of samples each erased neuron was found in."""
    privates = [_private(r) for r in requests]  # refuse before any work
    t0 = time.perf_counter()
    per_sample = [detect(lm, r.rendered, p, hp) for r, p in zip(requests, privates)]
    neurons, counts = aggregate(per_sample, hp.threshold, hp.n_neurons)
    if not neurons:
        raise NoNeuronsError("DEPN found no privacy neuron: no sample has a positive attribution")
    t1 = time.perf_counter()
    e = kn_erase(neurons, model=lm, relation="depn")
    e.method, e.requests = "depn", list(requests)
    e.layer_reason = "layers of the most frequent privacy neurons (integrated gradients, Wu et al. 2023)"
    e.hparams = {**asdict(hp), "neurons": [list(n) for n in neurons]}
    e.metrics = {"samples_per_neuron": [counts[n] for n in neurons], "n_samples": len(requests)}
    e.timings = {"detect_s": t1 - t0, "total_s": time.perf_counter() - t0}
    return e


# ---------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def leak(prompt: str, private: str, *, model=None) -> dict:
    """How much the model leaks ``private`` after ``prompt`` now: ``p`` (its probability as a whole
    continuation), ``ranks`` (each token's rank, 1 = top, teacher-forced), ``mrr`` (mean of 1/rank) and
    ``verbatim`` (greedy decoding reproduces it: every rank is 1)."""
    lm = resolve_model(model)
    ids = lm.encode(prompt)
    target = lm.target_ids(private, prompt)
    x = torch.tensor([ids + target], device=lm.device)
    logp = lm.hf_model(input_ids=x).logits[0, len(ids) - 1: len(ids) - 1 + len(target)].float().log_softmax(-1)
    tgt = torch.tensor(target, device=logp.device)
    chosen = logp.gather(-1, tgt[:, None])[:, 0]
    ranks = (logp > chosen[:, None]).sum(-1).add(1).tolist()
    return {"p": float(chosen.sum().exp()), "logp": float(chosen.sum()), "ranks": ranks,
            "mrr": sum(1.0 / r for r in ranks) / len(ranks), "verbatim": all(r == 1 for r in ranks)}


def _means(rows: list[dict]) -> dict:
    return {"p": sum(r["p"] for r in rows) / len(rows), "mrr": sum(r["mrr"] for r in rows) / len(rows),
            "verbatim": sum(r["verbatim"] for r in rows) / len(rows)}


def depn_report(e: Edit, unrelated: Sequence[Request] = (), *, model=None) -> dict:
    """Leak before/after for each of ``e``'s private strings (:func:`leak`) and their means; locality on
    ``unrelated`` facts (prompt -> ``target_new``): the share whose top-1 next token is unchanged, and
    the mean |Δ log P(answer)|. ``e`` must not be applied; it is applied and reverted here."""
    lm = resolve_model(model)
    samples = [(r.rendered, _private(r)) for r in e.requests]
    before = [leak(p, s, model=lm) for p, s in samples]
    loc_before = [(leak(r.rendered, r.target_new, model=lm), int(lm.last_logits([r.rendered])[0].argmax()))
                  for r in unrelated]
    with applied(lm, e):
        after = [leak(p, s, model=lm) for p, s in samples]
        loc_after = [(leak(r.rendered, r.target_new, model=lm), int(lm.last_logits([r.rendered])[0].argmax()))
                     for r in unrelated]
    out = {"samples": [{"prompt": p, "private": s, "before": b, "after": a} for (p, s), b, a in zip(samples, before, after)],
           "before": _means(before), "after": _means(after), "n_neurons": len(e.hparams.get("neurons", []))}
    if unrelated:
        out["locality_top1_unchanged"] = sum(b[1] == a[1] for b, a in zip(loc_before, loc_after)) / len(unrelated)
        out["locality_mean_abs_dlogp"] = sum(abs(a[0]["logp"] - b[0]["logp"])
                                             for b, a in zip(loc_before, loc_after)) / len(unrelated)
    return out


def memorised_known(path, *, model=None, n: int | None = None, limit: int | None = None) -> list[Request]:
    """The stand-in for DEPN's private data (module docstring): known_1000 facts (``path``) whose answer
    the model reproduces verbatim after the prompt (greedy: every token top-1), as requests whose
    ``target_true`` is that answer (``target_new`` is a placeholder DEPN does not use). ``n``: look at
    the first ``n`` facts; ``limit``: return at most this many."""
    lm = resolve_model(model)
    out = []
    for c in load_known(path, n=n):
        r = c.request
        if leak(r.rendered, r.target_new, model=lm)["verbatim"]:
            out.append(Request(r.prompt, r.subject, " [erased]", r.target_new))
            if limit is not None and len(out) >= limit:
                break
    return out
