"""Lenses: what the residual stream entering each layer already predicts, read three ways.

==============================  ==================================================================
:class:`TunedLens`              per-layer affine translators ``h + A_l h + b_l``, zero-initialised (= the logit lens)
:func:`train_tuned_lens`        fit them to minimise KL(final || lens): :class:`TunedLensFit`
:class:`JacobianLens`           per-layer prompt-averaged Jacobians ``J_l`` to the final residual (training-free)
:func:`fit_jacobian_lens`       estimate ``J_l`` by batched vector-Jacobian products
:func:`compare`                 per lens and layer: KL to final, top-1 agreement, top-5 overlap, loss, perplexity
:func:`diagnostics`             fidelity per lens and layer: top-k agreement, kurtosis, autocorrelation, effective dim
:func:`commitment`              per token and lens: the layer from which the final prediction is top-1 (top-3, p > 0.5)
:func:`top_tokens`              per lens, token and layer: the lens's top-1 token and its probability (the heat-map)
:func:`fingerprint`             what a stored lens remembers of its model (to refuse a stale lens)
==============================  ==================================================================

Layers follow :func:`workbench.residual.logit_lens`: layer ``l < L`` reads ``h_l``, the residual
entering block ``l`` (layer 0: the embeddings), and layer ``L`` the final residual, where every lens
is the model's own output. Every lens is read through the model's own final norm and unembedding
(its adapter's ``unembed``), so all of this works for every model an adapter of :mod:`workbench.hooks`
reads: our Transformers and residual MLPs (one "position" per example) and the Hugging Face families.

- Logit lens (nostalgebraist 2020): ``W_U norm(h_l)``.
- Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned
  Lens"): ``W_U norm(h_l + A_l h_l + b_l)``; ``A_l, b_l`` start at 0 and are trained on frozen-model
  activations to minimise ``KL(p_final || p_lens)`` at the same position, with the reference's SGD.
- Jacobian lens (Gurnee et al. 2026, "Verbalizable Representations Form a Global Workspace in
  Language Models"): ``W_U norm(J_l h_l)`` with ``J_l = E_prompt[(1/|P|) sum_{t in P} sum_{t' in P}
  d h_final,t' / d h_l,t]`` (``P``: positions from ``skip_first`` on; causality leaves only
  ``t' >= t``). The logit lens is ``J = I``.

Stored lenses (:meth:`TunedLens.save`, :meth:`TunedLens.save_to_run`) are a folder with
``lens.safetensors`` and ``lens.json`` (format tag, the model's :func:`fingerprint`, the tensors'
SHA-256 and how the lens was trained), each written atomically; loading refuses a lens whose model
differs (layers, width, vocabulary, or the final norm and unembedding weights) with a message naming why.

Definitions: ``docs/definitions.md#tuned-lens``, ``#jacobian-lens``, ``#lens-diagnostics``,
``#commitment-layer``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as _load_tensors
from safetensors.torch import save_file

from .core import checks
from .core import monitor as _monitor
from .hooks import Adapter, adapter
from .residual import (LENS_STATS, TOKEN_CHUNK, _as_batch, _chunks, _inference, _lens_reduce, _logits, _need_layers,
                       _replace_input, _replace_output, _resid_stream, _table, _targets, _tokens)
from .io.store import _atomic_write

__all__ = ["TunedLens", "TunedLensFit", "train_tuned_lens", "JacobianLens", "fit_jacobian_lens", "compare",
           "diagnostics", "commitment", "top_tokens", "fingerprint", "LENSES", "CRITERIA"]

LENSES = ("logit", "tuned", "jacobian")
CRITERIA = ("top1", "top3", "p50")
FORMAT = "depth-workbench-lens"
VERSION = 1
TENSORS_FILE = "lens.safetensors"
META_FILE = "lens.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# ============================================================================ the model a lens belongs to


def fingerprint(model) -> dict:
    """What a lens remembers of its model: ``n_layers``, ``d_model``, ``vocab`` (rows of the unembedding),
    ``unembed_sha256`` (SHA-256 of the final norm's parameters and the unembedding weight and bias, as
    float32) and, for information only, the model class and family."""
    ad = adapter(model)
    w, b = ad.readout()
    digest = hashlib.sha256()
    named = [("readout.weight", w), ("readout.bias", b)] + [(f"final_norm.{n}", p)
                                                            for n, p in ad.final_norm().named_parameters()]
    for name, t in named:
        if t is None:
            continue
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return {"model": type(ad.model).__name__, "family": ad.family, "n_layers": int(ad.n_layers),
            "d_model": int(w.shape[1]), "vocab": int(w.shape[0]), "unembed_sha256": digest.hexdigest()}


_FACTS = (("n_layers", "layers"), ("d_model", "d_model (residual width)"), ("vocab", "vocabulary size (readout rows)"))


def _stale_reason(stored: dict, current: dict) -> str | None:
    for key, what in _FACTS:
        if stored.get(key) != current[key]:
            return f"it was made for a model with {what} {stored.get(key)}, this model has {current[key]}"
    if stored.get("unembed_sha256") != current["unembed_sha256"]:
        return ("the model's final norm and unembedding weights differ from those it was made for "
                "(another model, or the model trained on)")
    return None


class _StoredLens:
    """Saving, loading and the staleness check shared by :class:`TunedLens` and :class:`JacobianLens`."""

    kind = ""
    model_facts: dict
    info: dict

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def _from_stored(cls, facts: dict, info: dict, tensors: dict, where: str):
        raise NotImplementedError

    def check_model(self, model, where: str = "") -> None:
        """Raise ``ValueError`` (naming why) when ``model`` is not the model this lens was made for."""
        reason = _stale_reason(self.model_facts, fingerprint(model))
        if reason:
            raise ValueError(f"stale {self.kind} lens{' ' + where if where else ''}: {reason}; "
                             f"make a new lens for this model")

    def save(self, path) -> Path:
        """Write the lens into the folder ``path`` (created): ``lens.safetensors`` then ``lens.json``,
        each atomically (a temporary file, fsync, rename). ``lens.json`` holds the SHA-256 of the tensors,
        so a save interrupted between the two files is refused on load, never read half-old. Returns the folder."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self._tensors().items()}
        _atomic_write(folder / TENSORS_FILE, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
        doc = {"format": FORMAT, "version": VERSION, "kind": self.kind, "model": self.model_facts,
               "tensors_sha256": hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest(),
               "info": _plain(self.info)}
        text = json.dumps(doc, indent=1, allow_nan=False)
        _atomic_write(folder / META_FILE, lambda p: Path(p).write_text(text, encoding="utf-8"))
        return folder

    @classmethod
    def load(cls, path, model):
        """The lens saved in folder ``path``, for ``model`` (moved to its device). Refused with
        ``ValueError`` naming the file and why: missing or foreign files, a tensors file that does
        not match ``lens.json``, another kind of lens, or a stale lens (made for another model)."""
        folder = Path(path)
        meta = folder / META_FILE
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"path: no saved lens in {folder} ({META_FILE} is missing)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{meta}: not a depth-workbench lens (format tag missing or foreign)")
        if doc.get("version") != VERSION:
            raise ValueError(f"{meta}: unsupported lens format version {doc.get('version')!r} (expected {VERSION})")
        if doc.get("kind") != cls.kind:
            raise ValueError(f"{meta}: this is a {doc.get('kind')!r} lens, not a {cls.kind!r} lens")
        facts = doc.get("model")
        if not isinstance(facts, dict):
            raise ValueError(f"{meta}: field 'model' is missing")
        reason = _stale_reason(facts, fingerprint(model))
        if reason:
            raise ValueError(f"stale {cls.kind} lens in {folder}: {reason}; make a new lens for this model")
        try:
            raw = (folder / TENSORS_FILE).read_bytes()
        except FileNotFoundError:
            raise ValueError(f"{folder / TENSORS_FILE}: missing") from None
        if hashlib.sha256(raw).hexdigest() != doc.get("tensors_sha256"):
            raise ValueError(f"{folder / TENSORS_FILE} does not match {META_FILE} (an interrupted save, or an edited "
                             "file); save the lens again")
        try:
            tensors = _load_tensors(raw)
        except SafetensorError as e:
            raise ValueError(f"{folder / TENSORS_FILE}: unreadable ({e})") from None
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{folder / TENSORS_FILE}: non-finite values in {bad}")
        info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
        lens = cls._from_stored(facts, info, tensors, str(folder / TENSORS_FILE))
        return lens._to(adapter(model).device)

    def _to(self, device):
        return self

    def save_to_run(self, store, run_id: str, name: str | None = None) -> Path:
        """Store the lens with the run it belongs to: folder ``runs/<run_id>/lenses/<name>`` of the
        :class:`~workbench.store.RunStore` (``name`` default: the lens kind, ``"tuned"`` or ``"jacobian"``).
        The run's model must be the lens's model (else ``ValueError``: stale). Deleting the run deletes it."""
        name = self.kind if name is None else _check_name(name)
        self.check_model(store.load(run_id).model, where=f"for run {run_id!r}")
        return self.save(store._dir(run_id) / "lenses" / name)

    @classmethod
    def from_run(cls, store, run_id: str, model=None, name: str | None = None):
        """The lens stored with run ``run_id`` under ``name`` (default: the lens kind), for ``model``
        (default: the run's own model, loaded from the store). Refused like :meth:`load`."""
        name = cls.kind if name is None else _check_name(name)
        if model is None:
            model = store.load(run_id).model
        folder = store._dir(run_id) / "lenses" / name
        if not (folder / META_FILE).exists():
            raise ValueError(f"name: run {run_id!r} has no stored lens {name!r}")
        return cls.load(folder, model)


def _check_name(name) -> str:
    name = checks.check_str("name", name, 64)
    if not _NAME.fullmatch(name):
        raise ValueError(f"name must be 1 to 64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {name!r}")
    return name


def _plain(value):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.integer, np.floating)):
        return _plain(value.item())
    return value


def _participation_ratio(m: torch.Tensor) -> float:
    """Effective dimension of a linear map: ``(sum s_i^2)^2 / sum s_i^4`` over its singular values ``s``."""
    s2 = torch.linalg.svdvals(m.double()).pow(2)
    return float(s2.sum() ** 2 / s2.pow(2).sum()) if float(s2.sum()) > 0 else 0.0


# ============================================================================ tuned lens


class TunedLens(nn.Module, _StoredLens):
    """Per-layer affine translators of the tuned lens (Belrose et al. 2023).

    ``translators[l]`` is an ``nn.Linear(C, C)`` (``A_l``, ``b_l``) for layers ``0 .. L-1``; layer ``L``
    needs none. ``transform(h, l) = h + A_l h + b_l``, added residually as in the reference code so that
    weight decay pulls towards the identity. New translators are zero, so an untrained tuned lens is
    exactly the logit lens. ``TunedLens(model)`` makes one for ``model`` (float32, on its device);
    :func:`train_tuned_lens` trains it. ``info`` records how it was trained (saved with it).
    See ``docs/definitions.md#tuned-lens``.
    """

    kind = "tuned"

    def __init__(self, model):
        super().__init__()
        ad = adapter(model)
        _need_layers(ad, "a tuned lens")
        self.model_facts = fingerprint(ad)
        C = self.model_facts["d_model"]
        self.translators = nn.ModuleList(nn.Linear(C, C) for _ in range(ad.n_layers))
        with torch.no_grad():
            for t in self.translators:
                t.weight.zero_()
                t.bias.zero_()
        self.info: dict = {"trained": False}
        self.to(ad.device)

    @property
    def n_layers(self) -> int:
        return len(self.translators)

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``h + A_l h + b_l`` for ``h (..., C)`` entering ``layer`` (``layer = L``: ``h`` itself), in ``h``'s dtype."""
        layer = checks.check_int("layer", layer, 0, self.n_layers)
        if layer == self.n_layers:
            return h
        t = self.translators[layer]
        return h + t(h.to(t.weight.dtype)).to(h.dtype)

    def matrix(self, layer: int) -> torch.Tensor:
        """The linear part ``I + A_l`` ``(C, C)`` of the translator of ``layer`` (identity at ``L``)."""
        layer = checks.check_int("layer", layer, 0, self.n_layers)
        C = self.model_facts["d_model"]
        eye = torch.eye(C)
        return eye if layer == self.n_layers else eye + self.translators[layer].weight.detach().float().cpu()

    def _tensors(self):
        return {k: v for k, v in self.state_dict().items()}

    def _to(self, device):
        return self.to(device)

    @classmethod
    def _from_stored(cls, facts, info, tensors, where):
        lens = cls.__new__(cls)
        nn.Module.__init__(lens)
        L, C = int(facts["n_layers"]), int(facts["d_model"])
        lens.model_facts = dict(facts)
        lens.translators = nn.ModuleList(nn.Linear(C, C) for _ in range(L))
        want = {f"translators.{l}.{p}": ((C, C) if p == "weight" else (C,)) for l in range(L) for p in ("weight", "bias")}
        if set(tensors) != set(want):
            raise ValueError(f"{where}: tensors {sorted(set(tensors) ^ set(want))[:4]} do not fit a tuned lens of "
                             f"{L} layers")
        for k, shape in want.items():
            if tuple(tensors[k].shape) != shape:
                raise ValueError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {shape}")
        lens.load_state_dict(tensors)
        lens.info = dict(info)
        return lens

    def __repr__(self) -> str:
        return (f"TunedLens(n_layers={self.n_layers}, d_model={self.model_facts['d_model']}, "
                f"trained={self.info.get('trained', False)})")


@dataclass
class TunedLensFit:
    """Result of :func:`train_tuned_lens`.

    ``history``: tidy ``step, layer, kl`` (mean KL(final || lens) of each training batch, before the
    step). ``tokens_asked = steps x batch_size x T``; ``tokens_seen``: tokens actually trained on;
    ``short``: fewer than asked (the data ran out, or Stop), also warned when it happens.
    """

    lens: TunedLens
    history: pd.DataFrame
    steps_asked: int
    steps_done: int
    tokens_asked: int
    tokens_seen: int
    stopped: bool

    @property
    def short(self) -> bool:
        return self.tokens_seen < self.tokens_asked

    def frame(self) -> pd.DataFrame:
        return self.history


def train_tuned_lens(model, x, steps: int = 250, batch_size: int = 32, lr_scale: float = 1.0,
                     momentum: float = 0.9, weight_decay: float = 1e-3, max_passes: int = 1, seed: int = 0,
                     lens: TunedLens | None = None, monitor=None) -> TunedLensFit:
    """Train a tuned lens on the frozen ``model``'s activations on ``x`` (Belrose et al. 2023).

    Loss per step: ``sum_l mean_tokens KL(p_final || p_lens,l)`` over layers ``0 .. L-1``, at the same
    position (the reference's ``token_shift = 0``). Optimiser as in the reference code: SGD with Nesterov
    momentum ``momentum``, learning rate ``lr_scale * (1 - momentum)``, weight decay ``weight_decay``, the
    rate decayed linearly to 0 over ``steps``, gradients clipped to norm 1. The model's weights never
    receive gradients.

    ``x``: token ids ``(N, T)`` (at most the context) or vectors ``(N, d_in)`` for a residual MLP.
    Batches of ``batch_size`` sequences are drawn in a seeded random order, each sequence once per pass,
    at most ``max_passes`` passes: when the data runs out before ``steps`` steps, training ends there
    with a warning and ``short`` set in the result (and in ``lens.info``), never silently. ``lens``:
    continue training this lens (default: a new zero lens). ``monitor``: progress and Stop
    (:mod:`workbench.monitor`); a stopped training returns the lens so far, also flagged.
    Returns a :class:`TunedLensFit`. See ``docs/definitions.md#tuned-lens``.
    """
    ad = adapter(model)
    _need_layers(ad, "train_tuned_lens")
    steps = checks.check_int("steps", steps, 1, 10**7)
    batch_size = checks.check_int("batch_size", batch_size, 1, 2**20)
    lr_scale = checks.check_float("lr_scale", lr_scale, 0.0, 100.0, lo_open=True)
    momentum = checks.check_float("momentum", momentum, 0.0, 1.0, hi_open=True)
    weight_decay = checks.check_float("weight_decay", weight_decay, 0.0, 1.0)
    max_passes = checks.check_int("max_passes", max_passes, 1, 10**6)
    seed = checks.check_seed("seed", seed)
    mon = _monitor.resolve(monitor)
    x = _as_batch(ad, x)
    if lens is None:
        lens = TunedLens(ad)
    elif not isinstance(lens, TunedLens):
        raise ValueError(f"lens must be a TunedLens or None, got {type(lens).__name__}")
    else:
        lens.check_model(ad)
        lens.to(ad.device)
    N = len(x)
    T = x.shape[1] if ad.family == "transformer" else 1
    L = ad.n_layers
    g = torch.Generator().manual_seed(seed)
    passes = min(max_passes, -(-steps * batch_size // N))           # only the passes the steps can use
    batches = torch.cat([torch.randperm(N, generator=g) for _ in range(passes)]).split(batch_size)
    runnable = min(steps, len(batches))
    params = list(lens.parameters())
    opt = torch.optim.SGD(params, lr=lr_scale * (1 - momentum), momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    rows: list[tuple[int, int, float]] = []
    seen = 0
    done = 0
    stopped = False
    was = ad.model.training
    ad.model.eval()
    try:
        for step in range(runnable):
            if mon.stopped:
                stopped = True
                break
            xb = x[batches[step].to(x.device)]
            with torch.no_grad():
                hs, logits = _resid_stream(ad, xb)
                logp_final = logits.float().log_softmax(-1)
                p_final = logp_final.exp()
            with torch.enable_grad():
                kls = []
                for l in range(L):
                    logp = ad.unembed(lens.transform(hs[l], l)).float().log_softmax(-1)
                    kls.append((p_final * (logp_final - logp)).sum(-1).mean())
                grads = torch.autograd.grad(torch.stack(kls).sum(), params)
            for p, gr in zip(params, grads):
                p.grad = gr
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            kls = [k.detach() for k in kls]
            rows.extend((step, l, float(k)) for l, k in enumerate(kls))
            seen += len(xb) * T
            done = step + 1
            mon.report(done / steps, f"tuned lens: step {done}/{steps}, mean KL {float(torch.stack(kls).mean()):.4f}")
    finally:
        ad.model.train(was)
    asked = steps * batch_size * T
    history = pd.DataFrame(rows, columns=["step", "layer", "kl"])
    last = history[history.step == done - 1]["kl"].mean() if done else float("nan")
    lens.info = {"trained": True, "steps_asked": steps, "steps_done": done, "tokens_asked": asked,
                 "tokens_seen": seen, "short": seen < asked, "stopped": stopped, "seed": seed,
                 "batch_size": batch_size, "lr_scale": lr_scale, "momentum": momentum,
                 "weight_decay": weight_decay, "max_passes": max_passes, "final_train_kl": float(last)}
    if seen < asked:
        why = ("stopped" if stopped else
               f"the data ran out ({N} sequences x {max_passes} pass{'es' if max_passes > 1 else ''})")
        msg = (f"tuned lens trained on {seen} of the {asked} tokens asked ({done} of {steps} steps): {why}"
               + ("" if stopped else "; pass more data or raise max_passes"))
        warnings.warn(msg, UserWarning, stacklevel=2)
        mon.report(None, msg, force=True)
    return TunedLensFit(lens, history, steps, done, asked, seen, stopped)


# ============================================================================ Jacobian lens


class JacobianLens(_StoredLens):
    """Per-layer averaged Jacobians ``J_l (C, C)`` of the final residual with respect to ``h_l``
    (Gurnee et al. 2026), for layers ``0 .. L-1``; layer ``L`` is the identity.

    ``transport(h, l) = J_l h`` (float32); the lens reads ``W_U norm(J_l h_l)``. Rows of ``J_l`` are
    output dimensions (the final residual), columns input dimensions (``h_l``), as in the reference
    code. ``info``: ``n_prompts``, ``skip_first``, ``stopped``. See ``docs/definitions.md#jacobian-lens``.
    """

    kind = "jacobian"

    def __init__(self, jacobians: torch.Tensor, model_facts: dict, info: dict | None = None):
        self.jacobians = jacobians.detach().float()
        self.model_facts = dict(model_facts)
        self.info = dict(info or {})
        self._on: dict = {}

    @property
    def n_layers(self) -> int:
        return int(self.jacobians.shape[0])

    @property
    def n_prompts(self) -> int:
        return int(self.info.get("n_prompts", 0))

    def transport(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``J_l h`` for ``h (..., C)`` entering ``layer`` (float32; ``layer = L``: ``h`` itself)."""
        layer = checks.check_int("layer", layer, 0, self.n_layers)
        if layer == self.n_layers:
            return h.float()
        key = (layer, h.device)
        if key not in self._on:
            self._on[key] = self.jacobians[layer].to(h.device)
        return h.float() @ self._on[key].T

    def matrix(self, layer: int) -> torch.Tensor:
        """``J_l`` ``(C, C)`` (identity at ``L``)."""
        layer = checks.check_int("layer", layer, 0, self.n_layers)
        return torch.eye(self.jacobians.shape[-1]) if layer == self.n_layers else self.jacobians[layer].cpu()

    def _tensors(self):
        return {"jacobians": self.jacobians}

    @classmethod
    def _from_stored(cls, facts, info, tensors, where):
        L, C = int(facts["n_layers"]), int(facts["d_model"])
        J = tensors.get("jacobians")
        if set(tensors) != {"jacobians"} or J is None or tuple(J.shape) != (L, C, C):
            raise ValueError(f"{where}: expected one tensor 'jacobians' of shape {(L, C, C)}, got "
                             f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
        return cls(J, facts, info)

    def __repr__(self) -> str:
        return (f"JacobianLens(n_layers={self.n_layers}, d_model={self.jacobians.shape[-1]}, "
                f"n_prompts={self.n_prompts})")


def _prompt_jacobians(ad: Adapter, x1: torch.Tensor, positions: torch.Tensor, dim_batch: int) -> torch.Tensor:
    """``(L, C, C)``: ``J_l[i, j] = (1/|P|) sum_{t in P} sum_{t' in P} d h_final[t', i] / d h_l[t, j]`` for one
    prompt ``x1 (1, ...)``; one forward of ``dim_batch`` copies, then one backward per ``dim_batch`` output
    dimensions with a one-hot cotangent (the reference's estimator)."""
    L = ad.n_layers
    xb = x1.expand(dim_batch, *x1.shape[1:])
    got: dict = {}

    def root(h):
        got[0] = h.detach().requires_grad_(True)
        return got[0]

    def keep(l):
        def fn(h):
            got[l] = h
            return h
        return fn

    def final(h, out):
        got["final"] = out
        return out
    with contextlib.ExitStack() as stack, torch.enable_grad():
        stack.enter_context(_replace_input(ad.block(0), root))
        for l in range(1, L):
            stack.enter_context(_replace_input(ad.block(l), keep(l)))
        stack.enter_context(_replace_output(ad.block(L - 1), final))
        _logits(ad, xb)
    out = got["final"]
    sources = [got[l] for l in range(L)]
    out_t = _tokens(out)
    C = out_t.shape[-1]
    J = torch.zeros(L, C, C, dtype=torch.float64)
    cot = torch.zeros_like(out_t)
    rows = torch.arange(dim_batch, device=out.device)
    n_passes = -(-C // dim_batch)
    for k in range(n_passes):
        d0, n = k * dim_batch, min(dim_batch, C - k * dim_batch)
        cot.zero_()
        cot[rows[:n, None], positions[None, :], d0 + rows[:n, None]] = 1.0
        grads = torch.autograd.grad(out, sources, grad_outputs=cot.reshape(out.shape), retain_graph=k < n_passes - 1,
                                    allow_unused=True)
        for l, gr in enumerate(grads):
            if gr is not None:
                J[l, d0:d0 + n] = _tokens(gr)[:n][:, positions].double().mean(1).cpu()
    return J


def fit_jacobian_lens(model, prompts, skip_first: int = 0, dim_batch: int | None = None,
                      monitor=None) -> JacobianLens:
    """Fit a Jacobian lens (Gurnee et al. 2026): ``J_l`` averaged over the prompts, every layer ``0 .. L-1``.

    Per prompt, with ``P = {skip_first, ..., T-1}``: ``J_l = (1/|P|) sum_{t in P} sum_{t' in P}
    d h_final,t' / d h_l,t``, ``h_l`` the residual entering block ``l`` and ``h_final`` the last block's
    output before the final norm; then the mean over prompts. Training-free: one forward of ``dim_batch``
    copies of the prompt and ``ceil(C / dim_batch)`` backward passes per prompt (``dim_batch`` default
    ``C``: one). Differences from the reference code: our layer ``l`` is the residual *entering* block
    ``l`` (theirs: leaving it), and the last position is kept (the estimate needs no next token).

    ``prompts``: token ids ``(N, T)`` (``skip_first < T``; the reference skips 16 positions of long
    prompts, our contexts are short: default 0) or vectors ``(N, d_in)`` for a residual MLP (one
    position). ``monitor``: progress per prompt and Stop (the lens of the prompts done so far, at least
    one; ``info["stopped"]``). See ``docs/definitions.md#jacobian-lens``.
    """
    ad = adapter(model)
    _need_layers(ad, "fit_jacobian_lens")
    mon = _monitor.resolve(monitor)
    was = ad.model.training
    ad.model.eval()
    try:
        x = _as_batch(ad, prompts, "prompts")
        T = x.shape[1] if ad.family == "transformer" else 1
        skip_first = checks.check_int("skip_first", skip_first, 0, T - 1)
        facts = fingerprint(ad)
        C = facts["d_model"]
        dim_batch = C if dim_batch is None else checks.check_int("dim_batch", dim_batch, 1, C)
        positions = torch.arange(skip_first, T, device=ad.device)
        total = torch.zeros(ad.n_layers, C, C, dtype=torch.float64)
        done = 0
        stopped = False
        for i in range(len(x)):
            total += _prompt_jacobians(ad, x[i:i + 1], positions, dim_batch)
            done += 1
            mon.report(done / len(x), f"Jacobian lens: prompt {done}/{len(x)}")
            if mon.stopped and done < len(x):
                stopped = True
                break
    finally:
        ad.model.train(was)
    info = {"n_prompts": done, "skip_first": skip_first, "positions": T - skip_first, "stopped": stopped,
            "dim_batch": dim_batch}
    return JacobianLens((total / done).float(), facts, info)


# ============================================================================ reading the lenses


def _readouts(ad: Adapter, tuned, jacobian) -> dict:
    """``{lens name: readout(layer, h) -> logits}`` for the logit lens and the lenses given."""
    out = {"logit": lambda l, h: ad.unembed(h)}
    if tuned is not None:
        if not isinstance(tuned, TunedLens):
            raise ValueError(f"tuned must be a TunedLens (train_tuned_lens(...).lens or TunedLens.load) or None, "
                             f"got {type(tuned).__name__}")
        tuned.check_model(ad)
        tuned.to(ad.device)
        out["tuned"] = lambda l, h: ad.unembed(tuned.transform(h, l))
    if jacobian is not None:
        if not isinstance(jacobian, JacobianLens):
            raise ValueError(f"jacobian must be a JacobianLens (fit_jacobian_lens or JacobianLens.load) or None, "
                             f"got {type(jacobian).__name__}")
        jacobian.check_model(ad)
        out["jacobian"] = lambda l, h: ad.unembed(jacobian.transport(h, l).to(h.dtype))
    return out


def _matrices(ad: Adapter, tuned, jacobian) -> dict:
    C = int(ad.readout()[0].shape[1])
    out = {"logit": lambda l: torch.eye(C)}
    if tuned is not None:
        out["tuned"] = tuned.matrix
    if jacobian is not None:
        out["jacobian"] = jacobian.matrix
    return out


def _layers(ad: Adapter, layers) -> list[int]:
    if layers is None:
        return list(range(ad.n_layers + 1))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of layers in [0, {ad.n_layers}] or None, got {layers!r}")
    return [checks.check_int("layers[]", l, 0, ad.n_layers) for l in layers]


def _start(model, what: str) -> Adapter:
    ad = adapter(model)
    _need_layers(ad, what)
    return ad


def _each_layer(ad: Adapter, readouts: dict, hs: list, logits: torch.Tensor):
    """Yield ``(lens, layer, ts, lens logits (B, t, V))`` over position chunks (bounded memory)."""
    L = ad.n_layers
    T = logits.shape[1]
    for t0 in range(0, T, TOKEN_CHUNK):
        ts = slice(t0, min(t0 + TOKEN_CHUNK, T))
        for name, fn in readouts.items():
            for l in range(L + 1):
                yield name, l, ts, (fn(l, hs[l][:, ts]) if l < L else logits[:, ts]).float()


def compare(model, x, y=None, tuned: TunedLens | None = None, jacobian: JacobianLens | None = None, layers=None,
            per_position: bool = False, batch_size: int | None = 256) -> pd.DataFrame:
    """The lenses side by side, per layer: one tidy frame with a ``lens`` column.

    Rows ``lens`` (``"logit"`` always, ``"tuned"`` and ``"jacobian"`` when given) x ``layer``
    (``0 .. L`` or ``layers``); columns as :func:`workbench.residual.logit_lens` (``kl_to_final``,
    ``top1_agree``, ``top5_overlap``, ``loss`` on ``y``, default the next token of ``x``) plus
    ``perplexity = exp(loss)``, averaged over tokens (or per position). The logit rows are exactly
    ``logit_lens``. A stale lens (made for another model) is refused. ``docs/definitions.md#tuned-lens``.
    """
    checks.check_bool("per_position", per_position)
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    ad = _start(model, "compare")
    chosen = _layers(ad, layers)
    readouts = _readouts(ad, tuned, jacobian)
    parts: dict = {}
    with _inference(ad.model):
        x = _as_batch(ad, x)
        yy = _targets(ad, x, y)
        for sl in _chunks(len(x), batch_size):
            hs, logits = _resid_stream(ad, x[sl])
            logits = logits if logits.dim() == 3 else logits[:, None]
            tgt = None if yy is None else yy[sl].reshape(logits.shape[:2])
            for name, fn in readouts.items():
                _lens_reduce(ad, hs[:-1], logits, tgt, parts, key=(name,), readout=fn)
    df = _table({k: torch.cat(v) for k, v in parts.items()}, ["lens", "layer"], LENS_STATS, None, per_position)
    df["perplexity"] = np.exp(df["loss"])
    return df[df["layer"].isin(chosen)].reset_index(drop=True)


DIAGNOSTICS = ["top1_agree", "topk_agree", "kurtosis", "autocorr", "eff_dim"]


def diagnostics(model, x, tuned: TunedLens | None = None, jacobian: JacobianLens | None = None, k: int | None = None,
                layers=None, batch_size: int | None = 256) -> pd.DataFrame:
    """Fidelity diagnostics per lens and layer (Gurnee et al. 2026), a tidy frame.

    Columns ``lens, layer, top1_agree, topk_agree, kurtosis, autocorr, eff_dim``:

    - ``topk_agree``: share of tokens whose model top-1 is among the lens's top-``k`` (default ``min(5, V)``;
      ``top1_agree``: k = 1; ``k`` is kept in ``df.attrs["k"]``);
    - ``kurtosis``: excess kurtosis of the lens logits over the vocabulary, mean over tokens
      (``E[(z - mean)^4] / var^2 - 3``; 0 for Gaussian logits, large when a few tokens stand out);
    - ``autocorr``: share of adjacent positions ``(t, t+1)`` of a sequence whose lens top-1 tokens are
      the same (NaN with one position);
    - ``eff_dim``: participation ratio ``(sum s^2)^2 / sum s^4`` of the singular values of the lens's
      linear map (``I`` for the logit lens: ``C``; ``I + A_l`` tuned; ``J_l`` Jacobian).

    ``docs/definitions.md#lens-diagnostics``.
    """
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    ad = _start(model, "diagnostics")
    chosen = _layers(ad, layers)
    readouts = _readouts(ad, tuned, jacobian)
    sums: dict = {}
    with _inference(ad.model):
        x = _as_batch(ad, x)
        V = int(ad.readout()[0].shape[0])
        k = min(5, V) if k is None else checks.check_int("k", k, 1, V)
        for sl in _chunks(len(x), batch_size):
            hs, logits = _resid_stream(ad, x[sl])
            logits = logits if logits.dim() == 3 else logits[:, None]
            final_top = logits.argmax(-1)
            tops: dict = {}
            for name, l, ts, z in _each_layer(ad, readouts, hs, logits):
                s = sums.setdefault((name, l), dict.fromkeys(["top1", "topk", "kurt", "n_kurt", "n", "same", "pairs"], 0.0))
                top = z.topk(k, dim=-1).indices
                ft = final_top[:, ts]
                s["top1"] += float((top[..., 0] == ft).sum())
                s["topk"] += float((top == ft[..., None]).any(-1).sum())
                c = z.double() - z.double().mean(-1, keepdim=True)
                m2 = c.pow(2).mean(-1)
                kurt = c.pow(4).mean(-1) / m2.pow(2) - 3.0
                ok = m2 > 0
                s["kurt"] += float(kurt[ok].sum())
                s["n_kurt"] += float(ok.sum())
                s["n"] += ft.numel()
                tops.setdefault((name, l), []).append(top[..., 0])
            for key, parts in tops.items():
                top1 = torch.cat(parts, dim=1)                      # (B, T)
                sums[key]["same"] += float((top1[:, 1:] == top1[:, :-1]).sum())
                sums[key]["pairs"] += top1[:, 1:].numel()
    mats = _matrices(ad, tuned, jacobian)
    rows = []
    for (name, l), s in sums.items():
        if l not in chosen:
            continue
        rows.append((name, l, s["top1"] / s["n"], s["topk"] / s["n"],
                     s["kurt"] / s["n_kurt"] if s["n_kurt"] else float("nan"),
                     s["same"] / s["pairs"] if s["pairs"] else float("nan"), _participation_ratio(mats[name](l))))
    df = _by_lens(pd.DataFrame(rows, columns=["lens", "layer"] + DIAGNOSTICS), ["layer"])
    df.attrs["k"] = k
    return df


def _hits(z: torch.Tensor, final_top: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per token ``(B, t)``: is the final top-1 the lens top-1, within its top-3, or above probability 0.5."""
    top3 = z.topk(min(3, z.shape[-1]), dim=-1).indices
    p = z.softmax(-1).gather(-1, final_top[..., None])[..., 0]
    return {"top1": top3[..., 0] == final_top, "top3": (top3 == final_top[..., None]).any(-1), "p50": p > 0.5}


def commitment(model, x, tuned: TunedLens | None = None, jacobian: JacobianLens | None = None,
               batch_size: int | None = 256) -> pd.DataFrame:
    """The commitment layer of every token under every lens: the first layer from which on the model's
    final prediction (its top-1 token) is the lens's top-1 and stays so up to layer ``L``.

    Criteria: ``"top1"``; ``"top3"`` (within the lens's top 3 from there on); ``"p50"`` (lens
    probability above 0.5 from there on; never met, NaN, when the model's own probability is at most
    0.5). Tidy frame ``batch, position, lens, criterion, token, layer`` (``token``: the model's top-1;
    ``layer`` in ``0 .. L``, float, NaN = never). ``docs/definitions.md#commitment-layer``.
    """
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    ad = _start(model, "commitment")
    readouts = _readouts(ad, tuned, jacobian)
    L = ad.n_layers
    frames = []
    with _inference(ad.model):
        x = _as_batch(ad, x)
        for sl in _chunks(len(x), batch_size):
            hs, logits = _resid_stream(ad, x[sl])
            logits = logits if logits.dim() == 3 else logits[:, None]
            final_top = logits.argmax(-1)                             # (B, T)
            B, T = final_top.shape
            hits: dict = {}
            for name, l, ts, z in _each_layer(ad, readouts, hs, logits):
                for crit, v in _hits(z, final_top[:, ts]).items():
                    hits.setdefault((name, crit, l), []).append(v)
            for name in readouts:
                for crit in CRITERIA:
                    layer = torch.full((B, T), float("nan"))
                    stays = torch.ones(B, T, dtype=torch.bool)
                    for l in range(L, -1, -1):
                        stays &= torch.cat(hits[(name, crit, l)], dim=1).cpu()
                        layer = torch.where(stays, torch.tensor(float(l)), layer)
                    bi, ti = np.meshgrid(np.arange(sl.start, sl.start + B), np.arange(T), indexing="ij")
                    frames.append(pd.DataFrame({"batch": bi.ravel(), "position": ti.ravel(), "lens": name,
                                                "criterion": crit, "token": final_top.cpu().numpy().ravel(),
                                                "layer": layer.numpy().ravel()}))
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["batch", "position"], kind="stable").reset_index(drop=True)


def top_tokens(model, x, tuned: TunedLens | None = None, jacobian: JacobianLens | None = None,
               batch_size: int | None = 256) -> pd.DataFrame:
    """Each lens's top-1 token at every position and layer (what the lens heat-map shows).

    Tidy frame ``lens, batch, position, layer, token, prob, final_token`` (``prob``: the lens's
    probability of its top-1; ``final_token``: the model's top-1 at that position). One row per lens,
    token and layer: pass the few sequences you want to look at. ``docs/definitions.md#commitment-layer``.
    """
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    ad = _start(model, "top_tokens")
    readouts = _readouts(ad, tuned, jacobian)
    frames = []
    with _inference(ad.model):
        x = _as_batch(ad, x)
        for sl in _chunks(len(x), batch_size):
            hs, logits = _resid_stream(ad, x[sl])
            logits = logits if logits.dim() == 3 else logits[:, None]
            final_top = logits.argmax(-1)
            for name, l, ts, z in _each_layer(ad, readouts, hs, logits):
                p, tok = z.softmax(-1).max(-1)                        # (B, t)
                B, t = tok.shape
                bi, ti = np.meshgrid(np.arange(sl.start, sl.start + B), np.arange(ts.start, ts.start + t), indexing="ij")
                frames.append(pd.DataFrame({"lens": name, "batch": bi.ravel(), "position": ti.ravel(), "layer": l,
                                            "token": tok.cpu().numpy().ravel(), "prob": p.cpu().numpy().ravel(),
                                            "final_token": final_top[:, ts].cpu().numpy().ravel()}))
    return _by_lens(pd.concat(frames, ignore_index=True), ["batch", "position", "layer"])


def _by_lens(df: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """Rows in the order logit, tuned, jacobian, then by ``then``."""
    return df.assign(_o=df["lens"].map(LENSES.index)).sort_values(["_o"] + then, kind="stable") \
        .drop(columns="_o").reset_index(drop=True)
