"""What every stored lens shares: the fingerprint of the model it belongs to, the refusal of a stale lens,
and its safetensors + JSON files (atomic, hashed) on disk or inside a run folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_tensors
from safetensors.torch import save_file

from ..core import checks
from ..hooks import adapter
from ..io.store.files import atomic_write

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
        atomic_write(folder / TENSORS_FILE, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
        doc = {"format": FORMAT, "version": VERSION, "kind": self.kind, "model": self.model_facts,
               "tensors_sha256": hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest(),
               "info": _plain(self.info)}
        text = json.dumps(doc, indent=1, allow_nan=False)
        atomic_write(folder / META_FILE, lambda p: Path(p).write_text(text, encoding="utf-8"))
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
        return self.save(store.run_dir(run_id) / "lenses" / name)

    @classmethod
    def from_run(cls, store, run_id: str, model=None, name: str | None = None):
        """The lens stored with run ``run_id`` under ``name`` (default: the lens kind), for ``model``
        (default: the run's own model, loaded from the store). Refused like :meth:`load`."""
        name = cls.kind if name is None else _check_name(name)
        if model is None:
            model = store.load(run_id).model
        folder = store.run_dir(run_id) / "lenses" / name
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
