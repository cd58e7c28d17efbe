"""Opening a model for the dashboard: :func:`open_model` (a model folder under the roots or a Hub name, in
a page's job) and :class:`ModelCache` (:data:`MODELS`: one process-wide, memory-bounded cache of opened
models that all sessions share).
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Any

from ...core import checks
from ...core import monitor as _monitor
from ...core.data.dataset import encode_text
from .gpt2 import EXPORT_META, load_gpt2
from .hf import load_hf, tokenizer_vocab
from .hub import (HUB_REFUSED, Stopped, _complete, _download, _hub_offline, _local_snapshot, _repo_folder,
                  check_download, check_hub_name, hub_allowed, hub_files, plan_download)


# ============================================================================ opening a model for the dashboard
#
# The dashboard opens a Hugging Face model in a page's job, never on the server's event loop:
# open_model is the one call (a model folder under the roots, or a Hub name), with the whole policy.
# Hub names are opt-in on a class server (hub_allowed), downloads are capped per model and in total
# before anything is fetched, and every opened model sits in one process-wide, memory-bounded cache
# (MODELS) that all sessions share.


MODEL_CACHE_ENV = "WORKBENCH_MODEL_CACHE_MB"  # memory of the shared cache of opened models (default 2048)


@dataclasses.dataclass(eq=False)
class OpenModel:
    """An opened Hugging Face model as the dashboard uses it (:func:`open_model`).

    ``vocab``: token strings by id (an export's vocabulary, else the tokenizer's), or None; ``dataset``:
    the dataset spec an export recorded, else None; ``tokenizer``: the model's own, or None. ``key``
    identifies the resolved model (a folder and its files' times, or a Hub name and commit); ``label``
    names it without its place on the server. The model is shared by every session that opened it:
    hold ``lock`` while running it (hooks are registered on its modules, so two analyses at once would
    see each other's), and never change its weights.
    """

    model: Any
    vocab: list | None
    dataset: dict | None
    tokenizer: Any
    key: tuple
    label: str
    nbytes: int
    lock: Any = dataclasses.field(default_factory=threading.RLock, repr=False)

    def encode(self, text: str, field: str = "text") -> list[int]:
        """``text`` as this model's token ids: its own tokenizer; else one id per character of its
        vocabulary (:func:`workbench.data.dataset.encode_text`, the rule of ``Dataset.encode``); else
        token ids typed as ``'3 1 4'``. Refused (``ValueError`` naming ``field``) when no token comes
        out, an id is outside the vocabulary, or there are more tokens than the model's context."""
        text = checks.check_str(field, text, 1 << 20)
        if self.tokenizer is not None:
            ids = [int(i) for i in self.tokenizer(text)["input_ids"]]
            if not ids:
                raise ValueError(f"{field}: the tokenizer gives no tokens for this text")
        else:
            parts = text.split()
            typed = bool(parts) and all(p.isdigit() for p in parts)
            if self.vocab and (not typed or all(c in self.vocab for c in text)):
                ids = encode_text(text, self.vocab, field).tolist()
            elif typed:
                ids = [int(p) for p in parts]
            else:
                raise ValueError(f"{field}: this model has no vocabulary: type token ids separated by spaces, "
                                 "e.g. '3 1 4'")
        if not ids:
            raise ValueError(f"{field}: type some text")
        cfg = getattr(self.model, "config", None)
        n_vocab = getattr(cfg, "vocab_size", None)
        if n_vocab is not None and any(not 0 <= i < int(n_vocab) for i in ids):
            raise ValueError(f"{field}: token ids must be in [0, {int(n_vocab) - 1}]")
        context = (getattr(cfg, "context", None) or getattr(cfg, "n_positions", None)
                   or getattr(cfg, "max_position_embeddings", None))
        if context is not None and len(ids) > int(context):
            raise ValueError(f"{field} has {len(ids)} tokens; this model's context is {int(context)}")
        return ids


def _model_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


class ModelCache:
    """The opened models of the whole server process, shared by every session (:data:`MODELS`).

    Keyed by the resolved model (a folder with its files' modification times, or a Hub name and its
    commit), each entry records who holds it (a page's token). Within the memory budget
    (``WORKBENCH_MODEL_CACHE_MB``, default 2048, read at each change) the least recently opened
    models no one holds are dropped; held ones stay (their sessions keep them in memory anyway).
    Two sessions opening one model at once load it once: the second waits for the first (stoppable).
    """

    def __init__(self, budget_mb: float | None = None):
        self._budget_mb = budget_mb
        self._lock = threading.Lock()
        self._entries: dict = {}          # key -> [OpenModel, set of holders], oldest first
        self._loading: dict = {}          # key -> Event set when that load ends

    def budget_bytes(self) -> int:
        mb = self._budget_mb if self._budget_mb is not None else checks.env_limit(MODEL_CACHE_ENV, 2048)
        return int(mb * 2**20)

    def open(self, key: tuple, load, holder: str, monitor=None) -> OpenModel:
        """The cached model of ``key`` (held by ``holder`` from now on), or ``load()`` (an OpenModel) once."""
        monitor = _monitor.resolve(monitor)
        while True:
            with self._lock:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    self._entries[key] = entry   # most recently used last
                    entry[1].add(holder)
                    return entry[0]
                loading = self._loading.get(key)
                mine = loading is None
                if mine:
                    loading = self._loading[key] = threading.Event()
            if not mine:
                while not loading.wait(0.1):   # another session loads it: wait, then look again
                    if monitor.stopped:
                        raise Stopped("stopped while another session opened the same model")
                continue
            try:
                opened = load()
                with self._lock:
                    self._entries[key] = [opened, {holder}]
                    self._evict()
                return opened
            finally:
                with self._lock:
                    self._loading.pop(key, None)
                loading.set()

    def release(self, holder: str, key: tuple | None = None) -> None:
        """``holder`` no longer holds ``key`` (None: any model); over the budget, unheld models are dropped."""
        with self._lock:
            for k, entry in self._entries.items():
                if key is None or k == key:
                    entry[1].discard(holder)
            self._evict()

    def _evict(self) -> None:
        budget = self.budget_bytes()
        total = sum(e[0].nbytes for e in self._entries.values())
        for k in list(self._entries):
            if total <= budget:
                break
            opened, holders = self._entries[k]
            if not holders:
                del self._entries[k]
                total -= opened.nbytes

    def entries(self) -> list[dict]:
        """``{"label", "key", "bytes", "holders"}`` of each cached model, least recently opened first."""
        with self._lock:
            return [{"label": e[0].label, "key": k, "bytes": e[0].nbytes, "holders": len(e[1])}
                    for k, e in self._entries.items()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


MODELS = ModelCache()


def _open_loaded(model, vocab, dataset, tokenizer, key, label) -> OpenModel:
    return OpenModel(model, vocab, dataset, tokenizer, key, label, _model_bytes(model))


def _open_folder(path: Path, key: tuple, label: str) -> OpenModel:
    try:
        if (path / EXPORT_META).is_file():   # one of ours, exported with its vocabulary and dataset
            model, meta = load_gpt2(path)
            return _open_loaded(model, meta.get("vocab"), meta.get("dataset"), None, key, label)
        model, tokenizer = load_hf(path)     # any supported family, its own tokenizer
    except ValueError as e:                  # name the model by its label, not by its place on the server
        raise ValueError(str(e).replace(str(path), label)) from None
    return _open_loaded(model, tokenizer_vocab(tokenizer), None, tokenizer, key, label)


def _files_stamp(path: Path) -> tuple:
    """When the folder's config and weights last changed (a re-exported folder is another model)."""
    stamps = []
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        try:
            stamps.append((f.name, os.stat(f).st_mtime_ns))
        except OSError:
            continue
    return tuple(stamps)


def open_model(*, folder=None, hub: str | None = None, user: str | None = None, home=None, roots=None,
               holder: str = "notebook", monitor=None, cache: ModelCache | None = None) -> OpenModel:
    """Open a Hugging Face model for the dashboard: exactly one of ``folder`` (a choice from
    :func:`workbench.roots.list_models` for ``user``; anything else is refused with
    :data:`workbench.roots.REFUSED`) or ``hub`` (a Hub name ``owner/name``).

    Folders: an export of ours (``workbench.json``) is read by :func:`load_gpt2` with its vocabulary and
    dataset spec, any other supported family by :func:`load_hf` with its tokenizer; messages name the
    model by its label, never by its place on the server.

    Hub names: refused for a signed-in ``user`` unless :func:`hub_allowed`. Online, the Hub's file listing
    gives the commit and the sizes (when it cannot be reached, a snapshot already on disk is opened); the
    config, tokenizer and safetensors files are checked against
    ``WORKBENCH_HUB_MAX_MB`` and, with what the dashboard has downloaded so far, ``WORKBENCH_HUB_CACHE_MB``
    (:func:`check_download`) before anything is fetched, then downloaded into :func:`workbench.roots.hub_cache`
    (the user's own folder on a class server, offered to nobody else until a teacher shares it; the shared
    one without sign-in). Offline (``HF_HUB_OFFLINE``) only what is on disk is read.

    ``home``: the run store's folder (default :func:`workbench.store.default_home`). ``holder``: who holds the
    model in ``cache`` (default :data:`MODELS`; release it with ``cache.release(holder)``). ``monitor``:
    progress and Stop (:class:`Stopped` is raised when stopped; a hanging Hub is left behind at once).
    """
    from .. import model_roots as _roots

    monitor = _monitor.resolve(monitor)
    cache = MODELS if cache is None else cache
    if (folder is None) == (hub is None):
        raise ValueError("open_model takes exactly one of folder or hub")
    if folder is not None:
        path = _roots.resolve_model(folder, roots, user=user, home=home)   # inside a root, or one fixed message
        label = _roots.label_of(path, roots, user=user, home=home)
        key = ("folder", str(path), _files_stamp(path))
        monitor.report(progress=0.05, message=f"loading {label}")
        return cache.open(key, lambda: _open_folder(path, key, label), holder, monitor)
    name = check_hub_name(hub.strip() if isinstance(hub, str) else hub)
    if not hub_allowed(user is not None):
        raise ValueError(HUB_REFUSED)
    target = _roots.hub_cache(user, home)
    caches = [target, _roots.hub_cache(None, home)] + ([] if user is not None else [Path(_roots.hf_hub_cache())])
    monitor.report(progress=0.02, message=f"loading {name}: asking the Hub")
    if _hub_offline():
        snap = _local_snapshot(name, caches)
        if snap is None:
            raise ValueError(f"Hub name {name!r}: not downloaded yet, and the Hub is offline on this server "
                             "(HF_HUB_OFFLINE); pick a model from the model folders")
        sha = snap.name
    else:
        try:
            sha, files = hub_files(name, monitor=monitor)
        except ValueError:   # the Hub cannot be reached (or refuses): what is on disk still opens
            snap = _local_snapshot(name, caches)
            if snap is None:
                raise
            sha, files = snap.name, {}
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise ValueError(f"Hub name {name!r}: the Hub gave no commit for it")
        snap = next((c / _repo_folder(name) / "snapshots" / sha for c in caches
                     if _complete(c / _repo_folder(name) / "snapshots" / sha)), None)
    key = ("hub", name, sha)
    label = f"{name} @ {sha[:10]}"

    def load() -> OpenModel:
        where = snap
        if where is None:
            plan = plan_download(name, files)
            present = {f for f in plan if (target / _repo_folder(name) / "snapshots" / sha / f).is_file()}
            check_download(name, files, plan, _roots.hub_dir(home), present)
            target.mkdir(parents=True, exist_ok=True)
            where = _download(name, sha, plan, files, target, monitor)
        monitor.report(progress=0.75, message=f"loading {label}")
        try:
            model, tokenizer = load_hf(where)
        except ValueError as e:
            raise ValueError(str(e).replace(str(where), label)) from None
        return _open_loaded(model, tokenizer_vocab(tokenizer), None, tokenizer, key, label)

    return cache.open(key, load, holder, monitor)
