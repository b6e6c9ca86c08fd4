"""Attribution patching: a first-order estimate of every causal-tracing score from one backward pass.

Causal tracing (:mod:`locate.causal_trace`) measures, for every state ``a = a(t, l)`` (token ``t``,
layer ``l``; the residual stream, the MLP output or the attention output), the **restoration effect**

    IE(t, l) = E_eps[ m(corrupted run, a <- a_clean) ] - E_eps[ m(corrupted run) ]            (1)

with ``m`` the probability of the answer token at the last position and ``eps`` the subject-embedding
noise. The exact path runs one forward per (token, layer, kind). Attribution patching (Nanda 2023,
"Attribution patching: activation patching at industrial scale"; Syed et al. 2023) replaces each
restoration by the first-order Taylor expansion of ``m`` around the corrupted run:

    IE_hat(t, l) = E_eps[ (a_clean(t, l) - a_corr(t, l; eps)) . dm/da(t, l) |_{corrupted, eps} ]   (2)

so every (t, l) of every kind comes from **one clean forward and one corrupted forward + backward**,
the noise samples batched (``S`` rows). For the ``mlp``/``attn`` kinds the exact path restores a
window ``W(l) = [l - w//2, l + w - w//2)`` of layers at once; its estimate is the sum of the
single-layer terms (cheap, and what attribution tools report; see "Windows" below for what it misses):

    IE_hat_W(t, l) = sum_{j in W(l)} IE_hat(t, j)                                              (3)

The result is a :class:`locate.causal_trace.CausalTrace` like the exact one, with
``scores[kind] = p_corrupted + IE_hat`` (so ``ie()``, ``argmax``, ``best_layer`` and the heatmaps of
:mod:`viz` read it unchanged) and ``method="attribution"``. ``p_clean`` and ``p_corrupted`` are the
exact endpoints, computed as the exact path computes them (same noise draw for the same seed).
Tokens before the subject are the same in the clean and corrupted runs, so their estimate is set to
exactly 0, as the exact path sets their score to ``p_corrupted``.

What it approximates, and where it is known to fail. (1) is a difference of ``m`` between two points
that can be far apart; (2) is exact only when ``m`` is linear along the segment between them:

* **Saturated softmax.** ``m`` is itself a softmax probability: when the corrupted run gives the
  answer almost no probability (``p_corrupted`` near 0) or almost all of it, ``dm/da`` is nearly 0 and
  every estimate shrinks towards 0 even where restoring the state gives ``p_clean`` back. Restoring
  the last token's final hidden state is the extreme case (exact: ``p_clean``; estimate: a tangent).
* **Saturated attention.** A restored key or query can move an attention head from one source token
  to another; the softmax over attention logits is then far from linear and the gradient through it
  (flat in its saturated regime) misses the effect: a false negative. Kramár et al. 2024 (AtP*,
  "An efficient and scalable method for localizing LLM behaviour to components", §3.1.1) recompute
  that softmax exactly for query and key nodes; not done here (see below).
* **Large, nonlinear effects.** With the reference noise (3 x the subject embedding std) the
  corrupted run is far from the clean one; layer norms, MLP nonlinearities and the answer softmax all
  bend along the way, so magnitudes are off even when the ranking holds. The estimate converges to
  the exact effect as the noise goes to 0 (``noise=`` a small number); the tests check that.
* **Cancellation.** A state whose direct and indirect paths push ``m`` in opposite directions can get
  a near-zero gradient although restoring it matters (Kramár et al. §3.1.2, whose GradDrop repeats the
  backward pass with the gradient through one layer dropped at a time). Windows (3) can also cancel.
* **Windows are sums, not joint restorations.** ``dm/da(t, j)`` includes the path from layer ``j``
  through the later layers of the window at token ``t``; the joint restoration overwrites those
  layers and cuts that path. So (3) counts it once per layer, and even as the noise goes to 0 it tends
  to the sum of the single-layer effects, not to the exact window score (``window=1`` has no such gap).

The nnsight tutorial "Attribution Patching" (https://nnsight.net/notebooks/tutorials/attribution_patching/)
shows the pattern, (2) with a clean-minus-corrupted difference and the gradient at the corrupted run,
and the same caveats. Use it as a fast first pass over many facts or a large model, and check the
states it flags with the exact path (``trace(..., tokens=[...])`` traces only chosen rows).

Cost and memory: one clean forward (1 row) and one forward + backward over the ``S`` noise rows,
about three forwards of ``S`` rows whatever the number of kinds and layers. The backward keeps the
corrupted run's activations (attention included) for ``batch_size`` rows at a time: for long prompts
pass a smaller ``batch_size`` (down to 1); the fast exact path's memory, unlike this one's, stays flat.

Not implemented: ``method="atp*"``. Kramár et al.'s QK fix recomputes the attention softmax for a
patched *query or key node*; the states traced here sit upstream of every later layer's queries and
keys, and carrying a restoration's change to each of them needs a forward-mode pass per state, which
is the cost of exact tracing. GradDrop alone (L more
backward passes, averaging absolute values) would estimate |IE| rather than IE, and is not AtP*.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ._tracing import clean_states, restored_layers, state_hook
from .model import HookedLM

ATTRIBUTION_METHODS = ("attribution",)


def corrupted_terms(lm: HookedLM, ids: Sequence[int], span: tuple[int, int], noise: torch.Tensor, answer_id: int,
                    clean: dict[str, torch.Tensor], *, batch_size: int = 256) -> tuple[float, dict[str, np.ndarray]]:
    """The corrupted run with gradients: ``(p_corrupted, term)``, ``term[name]`` (T,) being equation (2)
    for the state at hook point ``name``, summed over the width:

        term[name][t] = sum_s (a_clean(t) - a_corr,s(t)) . dm/da_s(t),   m = (1/S) sum_s P_s[answer]

    (``m`` is the mean over the ``S`` noise samples, so the sum over ``s`` is the expectation of (2)).
    ``dm/da`` is read by a gradient hook on each activation as the backward pass goes by, and reduced
    at once, so no (S, T, d) gradient is kept. Samples run ``batch_size`` rows at a time, each chunk one
    forward and one backward; the weights take no gradient (the embedding output is the only leaf)."""
    s0, s1 = span
    S, T = noise.shape[0], len(ids)
    term = {n: torch.zeros(T, dtype=torch.float64, device=lm.device) for n in clean}
    total = 0.0
    for a in range(0, S, batch_size):
        eps = noise[a:a + batch_size].to(lm.device)
        x = torch.tensor([list(ids)] * eps.shape[0], device=lm.device)

        def add_noise(h, hook, eps=eps):
            h = h.detach().clone().requires_grad_(True)  # the leaf the backward pass runs back to
            out = h.clone()
            out[:, s0:s1] += eps.to(h.dtype)
            return out

        def reader(name):
            def fn(h, hook):
                # a_clean - a_corr, (B, T, d), on the device of the block that made h
                diff = (clean[name][None].to(device=h.device, dtype=h.dtype) - h.detach()).double()

                def on_grad(g, diff=diff):
                    term[name].add_((diff * g.double()).sum(-1).sum(0).to(term[name].device))
                h.register_hook(on_grad)
                return h
            return fn

        hooks = [(lm.hook_embed, add_noise)] + [(n, reader(n)) for n in clean]
        with lm.eval_mode(), torch.enable_grad(), lm.hooks(hooks):
            logits = lm.hf_model(input_ids=x, logits_to_keep=1).logits[:, -1]
            p = logits.float().softmax(-1)[:, answer_id]  # P_s[answer], (B,)
            (p.sum() / S).backward()
        total += float(p.detach().sum())
    return total / S, {n: v.cpu().numpy() for n, v in term.items()}


def attribution_scores(lm: HookedLM, ids: Sequence[int], span: tuple[int, int], noise: torch.Tensor, answer_id: int,
                       kinds: Sequence[str], window: int, *, tokens: Sequence[int] | None = None,
                       batch_size: int = 256):
    """(p_corrupted, {kind: scores (T, L)}, timing): ``scores = p_corrupted + IE_hat`` with ``IE_hat``
    as equations (2) and (3) of the module docstring. ``tokens``: only these rows (the others NaN)."""
    t_start = time.perf_counter()
    L, T = lm.n_layers, len(ids)
    s0, _ = span
    names = sorted({state_hook(lm, k, l) for k in kinds for l in range(L)})
    _, clean = clean_states(lm, ids, names)  # clean[name]: (T, d)
    t_clean = time.perf_counter()
    # equation (2): one term per (hook point, token), summed over d and over the samples (m is their mean)
    p_corrupted, term = corrupted_terms(lm, ids, span, noise, answer_id, clean, batch_size=batch_size)
    t_grad = time.perf_counter()
    scores = {}
    for kind in kinds:
        ie = np.zeros((T, L))
        for l in range(L):
            # equation (3): a window's estimate is the sum of its layers' terms (hidden: the one layer)
            ie[:, l] = sum(term[state_hook(lm, kind, j)] for j in restored_layers(kind, l, window, L))
        ie[:s0] = 0.0  # before the subject the clean and corrupted runs agree: no effect, as the exact path
        scores[kind] = p_corrupted + ie
        if tokens is not None:
            scores[kind][[t for t in range(T) if t not in set(tokens)]] = np.nan
    timing = {"clean_run": t_clean - t_start, "corrupted_forward_backward": t_grad - t_clean,
              "attribution_total": time.perf_counter() - t_start}
    return p_corrupted, scores, timing
