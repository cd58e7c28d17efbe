"""Where the dashboard may load model directories from: configured roots, a listing, a guarded resolver.

The browser never sends a path. The server lists the Hugging Face-style model directories
(``config.json`` plus at least one ``*.safetensors`` file) found under a few configured roots,
the page offers them in a chooser, and :func:`resolve_model` turns the choice back into a
directory only if it lies inside a root. Anything else is refused with :data:`REFUSED`, one
fixed message that says nothing about the filesystem (the same whether the path exists or not).

Roots: ``$WORKBENCH_MODEL_ROOTS`` (``os.pathsep``-separated), else the run store's home
(:func:`workbench.store.default_home`) and the local Hugging Face hub cache (``$HF_HUB_CACHE``,
else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``). The engine API (``interop.load_gpt2``)
still takes any path: a notebook user reads their own files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["ENV", "REFUSED", "MAX_DEPTH", "model_roots", "hf_hub_cache", "list_models", "resolve_model"]

ENV = "WORKBENCH_MODEL_ROOTS"
REFUSED = "not one of the models offered: pick a model from the list (press Refresh to look again)"
MAX_DEPTH = 4            # directories below a root that the listing (and the resolver) looks at
MAX_ENTRIES = 20_000     # directory entries the listing reads at most, over all roots
_HF_SNAPSHOT = re.compile(r"^models--(?P<name>.+)/snapshots/(?P<rev>[^/]+)$")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def model_roots() -> list[Path]:
    """The configured roots, resolved (symlinks followed) and without duplicates; read at call time."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        raw = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    else:
        from .store import default_home

        raw = [default_home(), hf_hub_cache()]
    roots: list[Path] = []
    for p in raw:
        try:
            real = Path(os.path.realpath(p))
        except (OSError, ValueError):
            continue
        if real not in roots:
            roots.append(real)
    return roots


def _roots(roots) -> list[Path]:
    if roots is None:
        return model_roots()
    return [Path(os.path.realpath(Path(r).expanduser())) for r in roots]


def _inside(real: Path, root: Path) -> bool:
    return real == root or root in real.parents


def _root_of(real: Path, roots: list[Path]) -> Path | None:
    """The innermost root holding ``real`` (a resolved path), or None."""
    holding = [r for r in roots if _inside(real, r)]
    return max(holding, key=lambda r: len(r.parts)) if holding else None


def _is_model_dir(real: Path, roots: list[Path]) -> bool:
    """``config.json`` and a ``*.safetensors`` file, each a regular file whose target stays inside a root.

    (In the Hugging Face cache the files are symlinks into ``blobs/``, inside the same root.)
    """
    def ok(f: Path) -> bool:
        target = Path(os.path.realpath(f))
        return target.is_file() and _root_of(target, roots) is not None

    try:
        if not ok(real / "config.json"):
            return False
        return any(ok(f) for f in real.glob("*.safetensors"))
    except OSError:
        return False


def _label(rel: Path, root: Path, labels: dict) -> str:
    m = _HF_SNAPSHOT.match(rel.as_posix())
    if m:  # Hugging Face cache: models--org--name/snapshots/<revision>
        text = f"{m['name'].replace('--', '/')} @ {m['rev'][:10]}"
    else:
        text = f"{root.name or 'root'}/{rel.as_posix()}" if rel.parts else (root.name or "root")
    base, k = text, 2
    while text in labels:
        text, k = f"{base} ({k})", k + 1
    return text


def list_models(roots=None) -> dict[str, Path]:
    """``{label: directory}`` of the model directories under the roots, sorted by label.

    A bounded walk: at most :data:`MAX_DEPTH` levels below each root and :data:`MAX_ENTRIES`
    entries in all; hidden directories are skipped; a symlinked directory is followed only when its
    target lies inside the same root, and each real directory is visited once.
    """
    roots = _roots(roots)
    found: dict[Path, tuple[Path, Path]] = {}  # real dir -> (root, path relative to it)
    budget = [MAX_ENTRIES]
    seen: set[Path] = set()

    def walk(real: Path, root: Path, rel: Path, depth: int) -> None:
        if real in seen or budget[0] <= 0:
            return
        seen.add(real)
        if _is_model_dir(real, roots):
            found.setdefault(real, (root, rel))
        if depth >= MAX_DEPTH:
            return
        try:
            with os.scandir(real) as it:
                entries = []
                for e in it:
                    budget[0] -= 1
                    if budget[0] <= 0:
                        break
                    entries.append(e)
        except OSError:
            return
        for e in sorted(entries, key=lambda e: e.name):
            if e.name.startswith("."):
                continue
            try:
                if not e.is_dir():  # follows a symlink; checked below
                    continue
            except OSError:
                continue
            target = Path(os.path.realpath(e.path))
            if not _inside(target, root):
                continue  # a symlink out of the root
            walk(target, root, rel / e.name, depth + 1)

    for root in roots:
        if root.is_dir():
            walk(root, root, Path(), 0)
    labels: dict[str, Path] = {}
    for real, (root, rel) in sorted(found.items(), key=lambda kv: (str(kv[1][0]), kv[1][1].as_posix())):
        labels[_label(rel, root, labels)] = real
    return dict(sorted(labels.items()))


def resolve_model(choice, roots=None) -> Path:
    """The real directory of a model ``choice`` (a label or a directory from :func:`list_models`).

    Refused with :data:`REFUSED` (a ``ValueError``) unless, with symlinks resolved, it is a model
    directory at most :data:`MAX_DEPTH` levels inside a root (no hidden directory on the way), as
    the listing finds them; the message is the same whatever the
    reason, so it tells nothing about the server's files.
    """
    roots = _roots(roots)
    if not isinstance(choice, (str, os.PathLike)) or isinstance(choice, bytes):
        raise ValueError(REFUSED)
    try:
        text = os.fspath(choice)
        if not text or "\x00" in text:
            raise ValueError(REFUSED)
        if not os.path.isabs(text):
            listed = list_models(roots)
            if text not in listed:
                raise ValueError(REFUSED)
            text = os.fspath(listed[text])
        real = Path(os.path.realpath(text))
        root = _root_of(real, roots)
        rel = real.relative_to(root).parts if root is not None else ()
        if root is None or len(rel) > MAX_DEPTH or any(p.startswith(".") for p in rel) or not real.is_dir() \
                or not _is_model_dir(real, roots):
            raise ValueError(REFUSED)
    except (OSError, TypeError, RuntimeError):
        raise ValueError(REFUSED) from None
    return real
