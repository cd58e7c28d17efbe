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

Hub downloads made from the dashboard (:func:`workbench.interop.open_model`) live under the store's
home, in ``hub/`` (:func:`hub_cache`): without sign-in in ``hub/shared``; with sign-in each user's
in ``hub/users/<user>``, which only that user's listing offers until a teacher shares it
(:func:`share_model` moves it to ``hub/shared``, offered to everyone). Both are roots of their own
whatever ``$WORKBENCH_MODEL_ROOTS`` says; ``hub/users`` is never walked from another root.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["ENV", "REFUSED", "MAX_DEPTH", "model_roots", "hf_hub_cache", "list_models", "resolve_model", "hub_dir",
           "hub_cache", "label_of", "user_downloads", "share_model"]

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


def _home(home) -> Path:
    if home is None:
        from .store import default_home

        return default_home()
    return Path(home).expanduser()


def hub_dir(home=None) -> Path:
    """Where the dashboard's Hub downloads live: ``<store home>/hub`` (every user's, and the shared ones)."""
    return _home(home) / "hub"


def hub_cache(user: str | None = None, home=None) -> Path:
    """The Hugging Face cache a download goes to: ``hub/shared`` without sign-in (``user=None``), else the
    user's own ``hub/users/<user>`` (a name checked by :func:`workbench.store.check_user`)."""
    if user is None:
        return hub_dir(home) / "shared"
    from .store import check_user

    return hub_dir(home) / "users" / check_user("user", user)


def model_roots(user: str | None = None, home=None) -> list[Path]:
    """The roots a listing walks, resolved (symlinks followed) and without duplicates; read at call time.

    The configured ones (``$WORKBENCH_MODEL_ROOTS``, else the store's home and the Hugging Face cache),
    then the shared Hub downloads and, for a signed-in ``user``, that user's own.
    """
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        raw = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    else:
        raw = [_home(home), hf_hub_cache()]
    raw.append(hub_cache(None, home))
    if user is not None:
        raw.append(hub_cache(user, home))
    roots: list[Path] = []
    for p in raw:
        try:
            real = Path(os.path.realpath(p))
        except (OSError, ValueError):
            continue
        if real not in roots:
            roots.append(real)
    return roots


def _roots(roots, user=None, home=None) -> list[Path]:
    if roots is None:
        return model_roots(user, home)
    return [Path(os.path.realpath(Path(r).expanduser())) for r in roots]


def _private(home) -> Path:
    """The per-user download folders: walked only as a user's own root, never from another root."""
    return Path(os.path.realpath(hub_dir(home) / "users"))


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


def _label_text(rel: Path, root: Path) -> str:
    m = _HF_SNAPSHOT.match(rel.as_posix())
    if m:  # Hugging Face cache: models--org--name/snapshots/<revision>
        return f"{m['name'].replace('--', '/')} @ {m['rev'][:10]}"
    return f"{root.name or 'root'}/{rel.as_posix()}" if rel.parts else (root.name or "root")


def label_of(directory, roots=None, *, user=None, home=None) -> str:
    """How the listing names ``directory`` (without the ``(2)`` of a repeated name): the repository and
    revision of a Hugging Face cache snapshot, else the root's name and the path below it. Messages name
    a model by this, never by its place on the server; ``"the chosen model"`` outside every root."""
    real = Path(os.path.realpath(directory))
    root = _root_of(real, _roots(roots, user, home))
    return _label_text(real.relative_to(root), root) if root is not None else "the chosen model"


def _label(rel: Path, root: Path, labels: dict) -> str:
    text = _label_text(rel, root)
    base, k = text, 2
    while text in labels:
        text, k = f"{base} ({k})", k + 1
    return text


def list_models(roots=None, *, user: str | None = None, home=None) -> dict[str, Path]:
    """``{label: directory}`` of the model directories under the roots, sorted by label.

    ``roots``: the directories to walk (default :func:`model_roots` of ``user`` and ``home``: what that
    user is offered). A bounded walk: at most :data:`MAX_DEPTH` levels below each root and
    :data:`MAX_ENTRIES` entries in all; hidden directories are skipped; a symlinked directory is
    followed only when its target lies inside the same root, and each real directory is visited once;
    another user's downloads (``hub/users``) are walked only as their own root.
    """
    roots = _roots(roots, user, home)
    private = _private(home)
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
            if _inside(target, private) and not _inside(root, private):
                continue  # users' downloads: each is its owner's root
            if target in roots and target != root:
                continue  # a root inside this one: walked as its own root (labels relative to it)
            walk(target, root, rel / e.name, depth + 1)

    for root in roots:
        if root.is_dir():
            walk(root, root, Path(), 0)
    labels: dict[str, Path] = {}
    for real, (root, rel) in sorted(found.items(), key=lambda kv: (str(kv[1][0]), kv[1][1].as_posix())):
        labels[_label(rel, root, labels)] = real
    return dict(sorted(labels.items()))


def resolve_model(choice, roots=None, *, user: str | None = None, home=None) -> Path:
    """The real directory of a model ``choice`` (a label or a directory from :func:`list_models` with the
    same ``roots``, ``user`` and ``home``).

    Refused with :data:`REFUSED` (a ``ValueError``) unless, with symlinks resolved, it is a model
    directory at most :data:`MAX_DEPTH` levels inside a root (no hidden directory on the way, not
    another user's download), as the listing finds them; the message is the same whatever the
    reason, so it tells nothing about the server's files.
    """
    roots = _roots(roots, user, home)
    private = _private(home)
    if not isinstance(choice, (str, os.PathLike)) or isinstance(choice, bytes):
        raise ValueError(REFUSED)
    try:
        text = os.fspath(choice)
        if not text or "\x00" in text:
            raise ValueError(REFUSED)
        if not os.path.isabs(text):
            listed = list_models(roots, home=home)
            if text not in listed:
                raise ValueError(REFUSED)
            text = os.fspath(listed[text])
        real = Path(os.path.realpath(text))
        root = _root_of(real, roots)
        rel = real.relative_to(root).parts if root is not None else ()
        if root is None or len(rel) > MAX_DEPTH or any(p.startswith(".") for p in rel) or not real.is_dir() \
                or (_inside(real, private) and not _inside(root, private)) or not _is_model_dir(real, roots):
            raise ValueError(REFUSED)
    except (OSError, TypeError, RuntimeError):
        raise ValueError(REFUSED) from None
    return real


def user_downloads(home=None) -> list[dict]:
    """Every signed-in user's own Hub downloads (for the teacher): ``{"user", "label", "repo", "directory"}``
    per model snapshot, sorted by user and label. ``repo`` is the cache folder (``models--org--name``)
    :func:`share_model` takes."""
    users = hub_dir(home) / "users"
    out = []
    if not users.is_dir():
        return out
    for entry in sorted(users.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        root = Path(os.path.realpath(entry))
        for label, directory in list_models([root], home=home).items():
            repo = directory.relative_to(root).parts[0]
            out.append({"user": entry.name, "label": label, "repo": repo, "directory": directory})
    return out


def share_model(user: str, repo: str, home=None) -> Path:
    """Offer ``user``'s download ``repo`` (a cache folder ``models--org--name`` from :func:`user_downloads`)
    to everyone: it moves to the shared downloads (``hub/shared``), merged with what is there (snapshots and
    blobs already shared are kept). A teacher's action; the caller checks who asks. Returns the new folder."""
    if not isinstance(repo, str) or not re.fullmatch(r"models--[A-Za-z0-9][\w.-]*(--[A-Za-z0-9][\w.-]*)*", repo) \
            or ".." in repo:
        raise ValueError(f"repo must be a Hugging Face cache folder 'models--org--name', got {repo!r:.80}")
    source = hub_cache(user, home) / repo
    if not source.is_dir() or source.is_symlink():
        raise ValueError(f"{user!r} has no download {repo!r} to share")
    target = hub_cache(None, home) / repo
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(source, target)
        return target
    for sub in ("blobs", "snapshots"):   # merge: the snapshots' links are relative (../../blobs/<hash>)
        (target / sub).mkdir(exist_ok=True)
        if (source / sub).is_dir():
            for item in (source / sub).iterdir():
                if not (target / sub / item.name).exists():
                    os.replace(item, target / sub / item.name)
    import shutil

    shutil.rmtree(source, ignore_errors=True)
    return target
