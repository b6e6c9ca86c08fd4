"""Layer specs: the one place where "auto", an int, a list, a layer profile or a causal trace becomes layers.

Every editing method that needs layers takes the same spec and resolves it here, so ``"auto"`` means
the same thing everywhere: the window of ``n`` contiguous layers with the largest MLP indirect effect
at the last subject token, from the causal-tracing calibration of this model
(:func:`locate.layer_profile`). ROME is the case ``n = 1`` (the peak layer), MEMIT ``n = 5``.

=======================  =====================================================================
spec                      layers
=======================  =====================================================================
``"auto"``                ``layer_profile(lm).window(n)``
``int`` (any integral)    ``[spec]``
list / tuple / range      the given layers, sorted, checked, no repeats
``LayerProfile``          ``profile.window(n)``
``CausalTrace``           the window of ``n`` layers of largest MLP effect at its last subject token
=======================  =====================================================================
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .calibration import LayerProfile, layer_profile
from .causal_trace import CausalTrace
from .errors import LayerSpecError


def _as_layer(lm, x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        if isinstance(x, float) and x.is_integer():
            raise LayerSpecError(f"layer {x!r} is a float; pass the int {int(x)}")
        raise LayerSpecError(f"a layer must be an int, got {type(x).__name__} {x!r}")
    return lm.check_layer(int(x))


def resolve_layers(lm, spec: Any = "auto", n: int = 1) -> tuple[list[int], str]:
    """``(layers, reason)``: the sorted layers ``spec`` names on ``lm`` and a sentence saying why.

    ``n`` is the window size for the specs that choose layers (``"auto"``, a profile, a trace); it is
    checked (1..n_layers, never clamped) only for those."""
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool) or isinstance(spec, float):
        layer = _as_layer(lm, spec)
        return [layer], f"layer {layer}: chosen by the caller"
    if isinstance(spec, (list, tuple, range, np.ndarray)):
        out = [_as_layer(lm, x) for x in spec]
        if not out:
            raise LayerSpecError("the list of layers is empty")
        if len(set(out)) != len(out):
            raise LayerSpecError(f"layers {out} has repeats")
        return sorted(out), f"layers {sorted(out)}: chosen by the caller"
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= int(n) <= lm.n_layers:
        raise LayerSpecError(f"the number of layers to choose must be an int in 1..{lm.n_layers}, got {n!r}")
    n = int(n)
    if isinstance(spec, str):
        if spec != "auto":
            raise LayerSpecError(f"a layer spec string must be 'auto', got {spec!r}")
        profile, where = layer_profile(lm), "the tracing calibration of this model"
    elif isinstance(spec, LayerProfile):
        profile, where = spec, "the given layer profile"
    elif isinstance(spec, CausalTrace):
        if "mlp" not in spec.scores:
            raise LayerSpecError("the given causal trace has no 'mlp' scores to choose layers from")
        profile = LayerProfile(aie=spec.ie("mlp")[spec.token_index("last_subject")], n_facts=1, source="trace")
        where = "the given causal trace"
    else:
        raise LayerSpecError(f"a layer spec is 'auto', an int, a list of ints, a LayerProfile or a CausalTrace, "
                             f"not {type(spec).__name__}")
    if len(profile.aie) != lm.n_layers:
        raise LayerSpecError(f"{where} has {len(profile.aie)} layers; {lm.name} has {lm.n_layers}")
    out = [lm.check_layer(int(x)) for x in profile.window(n)]
    if n == 1:
        return out, f"layer {out[0]}: {profile.reason(out[0])} ({where})"
    return out, (f"layers {out}: the {n} contiguous layers with the largest MLP indirect effect at the last "
                 f"subject token, from {where}")


def resolve_layer(lm, spec: Any = "auto") -> tuple[int, str]:
    """``(layer, reason)`` for a method that edits exactly one layer: as :func:`resolve_layers` with
    ``n=1``, and a list naming several layers is refused (:class:`LayerSpecError`)."""
    layers, reason = resolve_layers(lm, spec, 1)
    if len(layers) != 1:
        raise LayerSpecError(f"this method edits one layer; the spec names {len(layers)}: {layers}")
    return layers[0], reason
