"""The cached-prefix runs used by the v*/z optimisation equal full forwards, on every architecture."""

from __future__ import annotations

import torch

from edit._prefix import split_rows, suffix_hidden


def full_hidden(lm, rows, hooks_for_row):
    """Final hidden states of each row run alone, with its own hook."""
    out = []
    for i, r in enumerate(rows):
        got = {}

        def grab(x, hook):
            got["h"] = x[0].detach().clone()
            return x

        with lm.hooks([*hooks_for_row(i), ("unembed.hook_in", grab)]):
            lm.hf_model(input_ids=torch.tensor([list(r)]))
        out.append(got["h"])
    return out


def test_suffix_runs_equal_full_runs(tiny):
    lm = tiny
    texts = ["The Eiffel Tower is located in the city of Paris",
             "Because it rained. The Eiffel Tower is located in",
             "Eiffel is a",
             "I think that, in the end, the Louvre is in"]
    rows = [lm.encode(t) for t in texts]
    starts = [3, 7, 0, len(rows[3]) - 2]
    vec = torch.randn(len(rows), lm.d_model)
    site = lm.hook_mlp_out(0)

    def add_at(i):
        def hook(x, hook):
            x = x.clone()
            x[0, starts[i]] += vec[i]
            return x
        return [(site, hook)]

    ref = full_hidden(lm, rows, add_at)
    sb = split_rows(lm, rows, starts)

    def add_first(x, hook):
        return torch.cat([(x[:, 0] + vec)[:, None], x[:, 1:]], 1)

    with torch.no_grad():
        h = suffix_hidden(lm, sb, [(site, add_first)])
    for i, (r, s) in enumerate(zip(rows, starts)):
        got = h[i, : len(r) - s]
        assert torch.allclose(got, ref[i][s:], atol=1e-4, rtol=1e-4), (i, (got - ref[i][s:]).abs().max())
        assert torch.isfinite(h[i]).all()
