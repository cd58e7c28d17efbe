"""How the workbench hooks a model: hook points, recording, and the adapter registry.

Every analysis that reads activations goes through this module:

- :class:`HookPoint` -- identity module marking a named site inside our own models
  (defined in :mod:`workbench.models`, re-exported here).
- :class:`Adapter` -- a uniform view of a residual model (hook sites, forward, final norm,
  unembedding, block skipping, per-head output maps). One adapter per model family lives in
  :mod:`workbench.adapters` (``native.py`` for our two families, ``hf_*.py`` for Hugging Face ones).
- :func:`register_adapter` / :func:`adapter` -- the registry: which adapter reads which model.
  Built-in adapters register themselves when :mod:`workbench.adapters` is first imported
  (lazily: ``transformers`` is only imported for a Hugging Face model).
- :func:`record` -- cache the activations of named sites while a block of code runs.
- :func:`watch` -- call a function on the output (or input) of arbitrary modules, e.g. the
  linear layers REPAIR renormalises. Both remove their hooks in ``finally``, also on error.

Site names follow TransformerLens: ``embed_out``, ``pos_embed_out``, ``blocks.{l}.resid_pre``,
``blocks.{l}.attn_out``, ``blocks.{l}.resid_mid``, ``blocks.{l}.mlp_out``, ``blocks.{l}.resid_post``
(``blocks.{l}.block_out`` in residual MLPs), ``blocks.{l}.attn.z`` (per-head attention outputs
``(B, T, H, D)`` entering the output projection) and ``features`` (the final-norm output).
"""
from __future__ import annotations

import contextlib
import fnmatch
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import checks
from ..core.models import HookPoint

__all__ = ["HookPoint", "Adapter", "ActivationCache", "register_adapter", "adapter", "supported", "sites", "record",
           "watch", "hf_model_type", "hf_model_types", "frozen_norm_of", "register_mixture", "is_mixture"]


# ============================================================================ adapters


class Adapter:
    """Uniform view of a residual model: hook sites, forward, unembedding, layer skipping.

    A subclass wraps one model family (see :mod:`workbench.adapters`). ``family`` is the kind of
    input the model takes: ``"transformer"`` (token ids ``(B, T)``) or ``"mlp"`` (vectors ``(B, d)``).
    """

    model: nn.Module
    family: str          # "transformer" or "mlp"
    n_layers: int
    n_heads: int = 0
    #: True for parallel blocks, where attention and MLP both read the block input (GPT-NeoX with
    #: ``use_parallel_residual``, Phi): such a block has the sites ``resid_pre, attn.z, attn_out,
    #: mlp_out, resid_post`` and no ``resid_mid``, and ``resid_post = resid_pre + attn_out + mlp_out``.
    #: Sequential (pre-LN) blocks have ``resid_mid = resid_pre + attn_out`` and
    #: ``resid_post = resid_mid + mlp_out``.
    parallel: bool = False

    def site_names(self) -> list[str]:
        raise NotImplementedError

    def add_hook(self, name: str, fn: Callable[[torch.Tensor], None]):
        """Call ``fn(activation)`` whenever site ``name`` is computed; returns a removable handle."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` (sequence) or ``(B, K)`` (vector)."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def readout(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unembedding ``(V, C)`` weight and optional ``(V,)`` bias."""
        raise NotImplementedError

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        w, b = self.readout()
        return F.linear(self.final_norm()(resid), w, b)

    def frozen_norm(self, final: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """The final norm linearised at the frozen scale of ``final`` ``(B, T, C)``: ``(f, b)`` with
        ``final_norm(r) ~= f(r) + b``, ``f`` linear in ``r`` and exact at ``r = final``.

        - ``nn.LayerNorm``: ``f(r) = (r - mean(r)) / sigma * weight``, ``sigma`` the standard
          deviation of ``final`` (with the norm's ``eps``), ``b`` its bias;
        - RMSNorm-like modules (``nn.RMSNorm``, any class whose name contains ``"RMSNorm"``, or a
          module with ``variance_epsilon`` and ``weight``): ``f(r) = r / rms * weight`` with
          ``rms = sqrt(mean(final^2) + eps)`` (eps from the module's ``eps`` or
          ``variance_epsilon``), ``b = 0``;
        - ``nn.Identity``: ``f(r) = r``, ``b = 0``.

        Statistics and results are float32 (half-precision models included). ``f`` applies to any
        tensor ``(..., B, T, C)`` (e.g. a stack of components). Another norm raises ``TypeError``;
        an adapter whose norm differs (e.g. Gemma's ``x * (1 + w)``) overrides this method.
        Definition: ``docs/definitions.md#frozen-norm``.
        """
        norm = self.final_norm()
        return frozen_norm_of(norm, final)

    def block(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def head_projection(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head output maps ``(H, D, C)`` and bias ``(C,)`` of layer ``layer``'s attention,
        so that ``attn_out = einsum('bthd,hdc->btc', z, W) + bias``."""
        raise NotImplementedError

    def watch_patterns(self, fn: Callable[[int, torch.Tensor], None], layers: Iterable[int]):
        """Context: while open, each forward calls ``fn(layer, pattern)`` once per layer in ``layers``,
        ``pattern`` the attention weights ``(B, H, T, T)`` (query, key) of that layer, one layer at a
        time (the caller keeps what it needs: memory stays one layer's patterns). A family without
        attention weights raises ``ValueError``. See ``docs/definitions.md#attention-pattern``."""
        raise ValueError(f"model: {type(self.model).__name__} has no attention weights to read (its adapter "
                         f"{type(self).__name__} does not implement watch_patterns)")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def skip(self, layer: int) -> Iterator[None]:
        """Replace block ``layer`` by the identity for the duration of the context."""
        if self.n_layers == 0:
            raise ValueError("layer: the model has no blocks to skip")
        checks.check_int("layer", layer, 0, self.n_layers - 1)

        def identity(module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        handle = self.block(layer).register_forward_hook(identity, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _rms_eps(norm: nn.Module, dtype: torch.dtype) -> float | None:
    """The eps of an RMSNorm-like module, ``None`` when ``norm`` is not one."""
    name = type(norm).__name__
    if not (isinstance(norm, getattr(nn, "RMSNorm", ())) or "RMSNorm" in name
            or (hasattr(norm, "variance_epsilon") and hasattr(norm, "weight"))):
        return None
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", None)
    return float(torch.finfo(dtype).eps if eps is None else eps)   # nn.RMSNorm(eps=None): the dtype's eps


def frozen_norm_of(norm: nn.Module, final: torch.Tensor, offset: float = 0.0):
    """``(f, b)`` of :meth:`Adapter.frozen_norm` for the module ``norm`` (``offset``: the RMSNorm gain
    is ``offset + weight``, 1 for Gemma). See ``docs/definitions.md#frozen-norm``."""
    C = final.shape[-1]
    zeros = torch.zeros(C, device=final.device, dtype=torch.float32)
    if isinstance(norm, nn.Identity):
        return (lambda r: r.float()), zeros
    if isinstance(norm, nn.LayerNorm):
        fin = final.float()
        sigma = (fin.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # (B, T, 1), frozen
        g = norm.weight.float() if norm.weight is not None else 1.0

        def f(r):
            r = r.float()
            return (r - r.mean(-1, keepdim=True)) / sigma * g
        b = norm.bias.float() if norm.bias is not None else zeros
        return f, b
    eps = _rms_eps(norm, final.dtype)
    if eps is not None:
        rms = (final.float().pow(2).mean(-1, keepdim=True) + eps).sqrt()      # (B, T, 1), frozen
        w = getattr(norm, "weight", None)
        g = (offset + w.float()) if w is not None else 1.0 + offset

        def f(r):
            return r.float() / rms * g
        return f, zeros
    raise TypeError(f"the final norm {type(norm).__name__} cannot be linearised: the workbench knows LayerNorm, "
                    "RMSNorm-like modules (a class name containing 'RMSNorm', or an eps/variance_epsilon and a "
                    "weight) and Identity; override Adapter.frozen_norm in the model's adapter")


@dataclass
class _Entry:
    name: str
    match: Callable[[Any], bool]
    factory: Callable[[nn.Module], Adapter] | str   # or "package.module:Class", imported on first use


_REGISTRY: list[_Entry] = []
_BUILTINS = "workbench.hooks.adapters"   # importing it registers the built-in adapters
_builtins_loaded = False


_MIXTURES: list[type] = []


def register_mixture(cls: type) -> type:
    """Declare ``cls`` a mixture of models: several residual streams, one output.

    A mixture has ``members`` (the models, each read by its own adapter), ``mode`` (``"logits"`` when
    its output is a weighted sum of the members' logits) and ``forward_parts(x) -> (output, member
    logits (..., K, V), weights (..., K))``. The residual analyses read every member inside the
    mixture (:func:`is_mixture`); the module that defines a mixture registers it (``compose`` does for
    :class:`~workbench.compose.LogitMixture`), so the analyses never import it.
    """
    if not isinstance(cls, type):
        raise ValueError(f"register_mixture takes a class, got {type(cls).__name__}")
    if cls not in _MIXTURES:
        _MIXTURES.append(cls)
    return cls


def is_mixture(model) -> bool:
    """Whether ``model`` is an instance of a registered mixture class (:func:`register_mixture`)."""
    return isinstance(model, tuple(_MIXTURES))


def register_adapter(predicate_or_type, factory, *, name: str | None = None) -> None:
    """Teach :func:`adapter` a model family.

    ``predicate_or_type``: a class (or tuple of classes) matched with ``isinstance``, or a
    predicate ``model -> bool`` (see :func:`hf_model_type`). ``factory``: ``model -> Adapter``, or
    the string ``"package.module:Class"`` so the module (and what it imports, e.g. ``transformers``)
    is only imported when such a model is met. ``name`` is what the "supported" message lists.
    Later registrations take precedence, so a user's adapter can override a built-in one.
    """
    if isinstance(predicate_or_type, type) or (isinstance(predicate_or_type, tuple)
                                               and all(isinstance(t, type) for t in predicate_or_type)):
        types = predicate_or_type

        def match(model, types=types):
            return isinstance(model, types)
        label = name or " / ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
    elif callable(predicate_or_type):
        match = predicate_or_type
        label = name or getattr(predicate_or_type, "label", None) or getattr(predicate_or_type, "__name__", "model")
    else:
        raise ValueError(f"predicate_or_type must be a class, a tuple of classes or a callable, "
                         f"got {predicate_or_type!r}")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise ValueError(f"factory must be a callable or 'module:attribute', got {factory!r}")
    _REGISTRY.insert(0, _Entry(label, match, factory))


def hf_model_type(*model_types: str) -> Callable[[Any], bool]:
    """A predicate for Hugging Face models by ``config.model_type`` (no ``transformers`` import needed)."""
    wanted = frozenset(model_types)

    def match(model) -> bool:
        cfg = getattr(model, "config", None)
        return isinstance(model, nn.Module) and getattr(cfg, "model_type", None) in wanted
    match.label = "Hugging Face " + " / ".join(sorted(wanted))
    match.model_types = wanted
    return match


def hf_model_types() -> list[str]:
    """The Hugging Face ``config.model_type`` values some registered adapter reads (sorted).

    Collected from the registered predicates' ``model_types`` attribute (set by
    :func:`hf_model_type`; a hand-written predicate may set it too)."""
    _load_builtins()
    types: set[str] = set()
    for e in _REGISTRY:
        types |= set(getattr(e.match, "model_types", ()))
    return sorted(types)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module(_BUILTINS)


def supported() -> list[str]:
    """Names of the registered model families, most recently registered first; Hugging Face
    families are named with the ``config.model_type`` values they read (see :func:`hf_model_types`)."""
    _load_builtins()
    return [e.name for e in _REGISTRY]


def _make(entry: _Entry, model) -> Adapter:
    factory = entry.factory
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        entry.factory = factory
    return factory(model)


def adapter(model) -> Adapter:
    """The :class:`Adapter` that reads ``model`` (an Adapter is returned as it is).

    An unknown model gets a ``TypeError`` listing what is supported.
    """
    if isinstance(model, Adapter):
        return model
    _load_builtins()
    for entry in _REGISTRY:
        if entry.match(model):
            return _make(entry, model)
    if hasattr(model, "members"):
        raise TypeError(f"{type(model).__name__} mixes several models and has no single residual stream; "
                        "contributions, logit_attribution, logit_lens and skip_effects take it directly (one "
                        "table per member); for other tools pass one of its .members")
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    what = f"{type(model).__name__}" + (f" (model_type {kind!r})" if kind else "")
    raise TypeError(f"no adapter reads {what}; supported: {', '.join(supported())} (Hugging Face model_type: "
                    f"{', '.join(hf_model_types())}). "
                    "Add one with workbench.hooks.register_adapter (see workbench/adapters/).")


def sites(model) -> list[str]:
    """All hook-site names of ``model``, in forward order per block."""
    return adapter(model).site_names()


# ============================================================================ recording


class ActivationCache(dict):
    """``{site name: activation}`` filled by :func:`record`; tensors are detached (not copied)."""

    def layer(self, site: str, layer: int) -> torch.Tensor:
        return self[f"blocks.{layer}.{site}"]

    def stack(self, site: str) -> torch.Tensor:
        """``(L, ...)``: one site of every recorded block, in layer order."""
        keys = sorted((k for k in self if re.fullmatch(rf"blocks\.\d+\.{re.escape(site)}", k)),
                      key=lambda k: int(k.split(".")[1]))
        if not keys:
            raise KeyError(f"no recorded blocks.*.{site}")
        return torch.stack([self[k] for k in keys])


def select_sites(all_names: list[str], names=None, layers=None) -> list[str]:
    """The site names matching ``names`` (names or shell patterns) and ``layers`` (block indices)."""
    if isinstance(names, str):
        names = [names]
    chosen = list(all_names)
    if names is not None:
        if not hasattr(names, "__iter__"):
            raise ValueError(f"names must be a site name, a pattern or a list of them, got {names!r}")
        names = [checks.check_str("names[]", n, 200) for n in names]
        chosen = [n for n in all_names if any(fnmatch.fnmatchcase(n, p) for p in names)]
        missing = [p for p in names if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
        if missing:
            raise ValueError(f"no hook site matches {missing}; sites are e.g. {all_names[:8]}")
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise ValueError(f"layers must be a list of block indices, got {layers!r}")
        keep = {checks.check_int("layers[]", i, 0) for i in layers}
        chosen = [n for n in chosen if not n.startswith("blocks.") or int(n.split(".")[1]) in keep]
    return chosen


@contextlib.contextmanager
def record(model, names: Iterable[str] | str | None = None,
           layers: Iterable[int] | None = None, fn: Callable[[str, torch.Tensor], None] | None = None
           ) -> Iterator[ActivationCache]:
    """Cache hook-site activations while the block runs; the hooks are removed on exit, also on error.

    ``names``: site names or shell patterns (``"blocks.*.resid_post"``); default all sites.
    ``layers``: keep only these blocks' sites (model-level sites such as ``embed_out`` stay).
    ``fn(name, activation)``: called instead of caching (e.g. to reduce each activation to running
    sums at once, so memory stays bounded); the yielded cache then stays empty. Cached tensors are
    detached views of the activations, not copies; a second forward inside the block overwrites them::

        with wb.hooks.record(model, names=["blocks.*.resid_post"]) as cache:
            model(x)
        cache["blocks.0.resid_post"]
    """
    ad = adapter(model)
    cache = ActivationCache()
    handles = []
    try:
        for name in select_sites(ad.site_names(), names, layers):
            handles.append(ad.add_hook(name, _storer(cache, name) if fn is None else _caller(fn, name)))
        yield cache
    finally:
        for h in handles:
            h.remove()


def _storer(cache: dict, name: str):
    def store(t: torch.Tensor) -> None:
        cache[name] = t.detach()
    return store


def _caller(fn, name: str):
    def call(t: torch.Tensor) -> None:
        fn(name, t.detach())
    return call


@contextlib.contextmanager
def watch(modules: Mapping[Any, nn.Module], fn: Callable[[Any, torch.Tensor], None], *,
          inputs: bool = False) -> Iterator[None]:
    """Call ``fn(key, tensor)`` with each module's output (or first input) on every forward.

    ``modules``: ``{key: module}``, any modules (e.g. the ``fc`` layers of each block). Tensors
    are detached. Hooks are removed on exit, also on error.
    """
    handles = []
    try:
        for key, module in modules.items():
            if inputs:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, key=key: fn(key, args[0].detach())))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, key=key: fn(key, (out[0] if isinstance(out, tuple) else out).detach())))
        yield
    finally:
        for h in handles:
            h.remove()
