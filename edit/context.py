"""Context templates and the subject key k* (ROME §3.1, "choosing k*").

ROME does not read the key of a subject from one prompt only. It averages the MLP key at the
subject's last token over the prompt preceded by short texts the model itself writes, so that the
edit fires for the subject in many contexts:

    k* = 1/N Σ_j k(x_j + s)            x_j: the N context templates ("{}" and "<sampled prefix>. {}")

Templates follow the reference code: the bare "{}" plus, for each (length, count) in ``lengths``,
``count`` samples of at most ``length`` tokens (top-k 5 sampling), started from the model-neutral words
"The", "Therefore", "Because", "I", "You" (as MEMIT's code does, so no architecture-specific start
token is needed), normalised as the reference normalises generated text (NFKD, blank lines to a space),
with braces removed and ". {}" appended. The ROME defaults ((5, 10), (10, 10)) give
21 templates. They are seeded, and cached in memory and on disk (``locate.cache_dir()/context/``, one
entry of :func:`locate.loading.write_cached`: format, key, SHA-256, atomic write). The key is the model
*as it is* (:func:`locate.loading.derived_cache_key`: weights, applied edits, library versions), the
seed and the lengths; a file that fails its check is reported (:class:`locate.loading.CacheRebuiltWarning`)
and regenerated. ``cache=False`` neither reads nor writes either cache.
"""

from __future__ import annotations

import numbers
import unicodedata
import warnings
from typing import Sequence

import torch

from locate import capture_at, resolve_model
from locate.errors import InvalidArgumentError
from locate.loading import CacheRebuiltWarning, cache_dir, derived_cache_key, read_cached, write_cached

from .request import Request

ROME_TEMPLATE_LENGTHS = ((5, 10), (10, 10))
_STARTS = ("The", "Therefore", "Because", "I", "You")
_FORMAT = "locate-edit/context-templates/3"  # 3: the shared cache entry of locate.loading (2: normalised text)


def normalize_generation(text: str) -> str:
    """The reference's clean-up of generated text (``util/generate.py``): NFKD, "\n\n" -> " "."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@torch.no_grad()
def sample(lm, prompt: str, n: int, n_new: int, generator: torch.Generator, top_k: int = 5) -> list[str]:
    """``n`` sampled continuations of ``prompt`` (prompt included), ``n_new`` new tokens each, top-k."""
    ids = torch.tensor([lm.encode(prompt)] * n, device=lm.device)
    past, step, out = None, ids, [ids]
    for _ in range(n_new):
        res = lm.hf_model(input_ids=step, past_key_values=past, use_cache=True)
        past = res.past_key_values
        top = res.logits[:, -1].float().topk(top_k, dim=-1)
        pick = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=generator).to(top.indices.device)
        step = top.indices.gather(-1, pick)
        out.append(step)
    texts = lm.tokenizer.batch_decode(torch.cat(out, 1), skip_special_tokens=True)
    return [normalize_generation(t) for t in texts]


def _is_template_list(templates, lengths) -> bool:
    """Whether ``templates`` is what :func:`context_templates` makes for ``lengths``: the bare "{}" first,
    one "{}" in each, as many as asked for."""
    return (isinstance(templates, list) and len(templates) == sum(template_groups(lengths))
            and templates[:1] == ["{}"] and all(isinstance(t, str) and t.count("{}") == 1 for t in templates))


def _check_lengths(lengths) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple((a, b) for a, b in lengths)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"lengths must be (token length, count) pairs, got {lengths!r}") from e
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1 for pair in out for x in pair):
        raise InvalidArgumentError(f"lengths must be pairs of positive ints, got {lengths!r}")
    return tuple((int(a), int(b)) for a, b in out)


def context_templates(model=None, *, seed: int = 0, lengths: Sequence[tuple[int, int]] = ROME_TEMPLATE_LENGTHS,
                      cache: bool = True) -> list[str]:
    """``["{}", "<prefix>. {}", ...]``: the bare template plus model-generated prefixes, seeded.
    ``cache=False`` generates them afresh (no memory or disk cache is read or written)."""
    lm = resolve_model(model)
    lengths = _check_lengths(lengths)
    model_key = derived_cache_key(lm)  # the model as it is now: weights, applied edits, library versions
    name = f"{model_key}-v3-seed{seed}-" + "-".join(f"{a}x{b}" for a, b in lengths)
    key = {"model": model_key, "seed": seed, "lengths": lengths}
    memo = lm.__dict__.setdefault("_context_templates", {})
    path = cache_dir() / "context" / f"{name}.json"
    if cache and name in memo:
        return list(memo[name])
    if cache:
        hit = read_cached(path, _FORMAT, key, what="context templates")
        if hit is not None and _is_template_list(hit[0], lengths):
            memo[name] = hit[0]
            return list(hit[0])
        if hit is not None:
            warnings.warn(f"context templates cache rejected, regenerating it: {path} does not hold "
                          f"{sum(template_groups(lengths))} templates", CacheRebuiltWarning, stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for length, count in lengths:
        per_start = [count // len(_STARTS) + (i < count % len(_STARTS)) for i in range(len(_STARTS))]
        for start, n in zip(_STARTS, per_start):
            if n == 0:
                continue
            n_new = max(1, length - len(lm.encode(start)))
            for text in sample(lm, start, n, n_new, gen):
                templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    if cache:
        memo[name] = templates
        write_cached(path, _FORMAT, key, body=templates)
    return list(templates)


def subject_last_token(lm, template: str, request: Request) -> tuple[list[int], int]:
    """Token ids of ``template`` filled with the request's rendered prompt, and the index of the
    subject's last token in them (found by character offsets, so a subject that also happens to
    occur in the sampled prefix is not mistaken for the real one)."""
    text = template.replace("{}", request.rendered)
    needle = request.subject.strip()
    char_start = template.index("{}") + request.prompt.index("{}") + request.subject.index(needle)
    char_end = char_start + len(needle)
    ids, offsets = lm._char_offsets(text)
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < char_end and b > char_start]
    if not inside:  # pragma: no cover - tokenizers without offsets fall back to the first occurrence
        start, end = lm.subject_span(text, request.subject)
        return ids, end - 1
    return ids, inside[-1]


def template_groups(lengths: Sequence[tuple[int, int]]) -> list[int]:
    """The sizes of the groups :func:`context_templates` returns its templates in: the bare "{}", then
    ``count`` templates for each ``(length, count)``."""
    return [1] + [int(count) for _, count in lengths]


def subject_keys(model, requests: Sequence[Request], layer: int, templates: Sequence[str],
                 groups: Sequence[int] | None = None) -> torch.Tensor:
    """k* for each request: the MLP key of ``layer`` at the subject's last token of the prompt placed in
    every template, averaged. Returns (B, d_mlp) in the model's dtype.

    ``groups=None`` weighs every template alike (ROME's ``compute_u``). ``groups`` (sizes of consecutive
    runs of ``templates``, e.g. :func:`template_groups`) averages within each group first and then across
    the groups, as MEMIT's ``compute_ks`` does: with ``[1, 5]`` the bare prompt weighs 1/2, not 1/6."""
    lm = resolve_model(model)
    lm.check_layer(layer)
    if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise InvalidArgumentError("every context template must contain exactly one '{}'")
    if groups is not None and (sum(groups) != len(templates) or any(g < 1 for g in groups)):
        raise InvalidArgumentError(f"template groups {list(groups)} do not partition the {len(templates)} templates")
    rows, pos = [], []
    for r in requests:
        r.check(lm)
        for t in templates:
            ids, i = subject_last_token(lm, t, r)
            rows.append(ids)
            pos.append(i)
    keys = capture_at(lm, rows, pos, lm.hook_mlp_key(layer)).reshape(len(requests), len(templates), -1)
    if groups is None:
        return keys.mean(1)
    return torch.stack([g.mean(1) for g in keys.split(list(groups), dim=1)], 1).mean(1)


def templates_for(lm, rt, lengths: Sequence[tuple[int, int]]) -> list[str]:
    """The context templates an editing method uses under the :class:`edit.registry.Runtime` ``rt``:
    generated once per run, by the model as the run's first edit found it, and reused by every later
    edit of the run (the reference code generates them once and keeps them for the whole run)."""
    memo = rt.cache.setdefault("context_templates", {})
    key = (lm.fingerprint, rt.seed, tuple(tuple(x) for x in lengths))
    if key not in memo:
        memo[key] = context_templates(lm, seed=rt.seed, lengths=lengths)
    return list(memo[key])
