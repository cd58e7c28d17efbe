"""Hub names on the dashboard: whether they may be opened (:func:`hub_allowed`), what a name may look like,
the download caps (:func:`hub_limits`), the Hub's file listing (:func:`hub_files`), what to fetch
(:func:`plan_download`, safetensors only) and whether it fits (:func:`check_download`), complete snapshots
on disk, and the stoppable download itself. Every Hub request runs on a watched helper thread, so a hung
Hub holds no job.
"""
from __future__ import annotations

import json
import os
import re
import stat
import threading
from pathlib import Path

from ...core import checks
from ...core import models as _models
from ...core import monitor as _monitor

# ============================================================================ Hub names, limits and downloads


ALLOW_HUB_ENV = "WORKBENCH_ALLOW_HUB"        # "1": signed-in users may name Hub models
HUB_MAX_ENV = "WORKBENCH_HUB_MAX_MB"         # largest download of one model (default 1024)
HUB_CACHE_ENV = "WORKBENCH_HUB_CACHE_MB"     # the dashboard's downloads on disk, all users (default 4096)
HUB_TIMEOUT = 20.0                           # seconds a request to the Hub may take
HUB_REFUSED = ("Hub name: Hub models are switched off on this class server; pick a model from the model folders "
               "(the teacher can allow Hub names: classroom serve --allow-hub, WORKBENCH_ALLOW_HUB=1)")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_HUB_EXTRA = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _hub_offline() -> bool:
    """True when the Hugging Face Hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read now."""
    if any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


class Stopped(RuntimeError):
    """Opening a model was stopped (the job's Stop) before it finished."""


def hub_allowed(signed_in: bool) -> bool:
    """Whether Hub names may be opened: always without sign-in (a laptop: the owner decides); with sign-in
    (a class server) only when the teacher allowed them, ``WORKBENCH_ALLOW_HUB=1`` (read at call time)."""
    if not signed_in:
        return True
    return os.environ.get(ALLOW_HUB_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_name(name) -> str:
    """A Hub name ``owner/name`` (letters, digits, ``- _ .``), and nothing that could name a place on the server."""
    if not isinstance(name, str) or not _HUB_NAME.fullmatch(name) or ".." in name \
            or Path(name).expanduser().exists():
        raise ValueError(f"Hub name must look like 'owner/name' (letters, digits, '-', '_', '.'), got {name!r:.120}")
    return name


def hub_limits() -> tuple[float, float]:
    """``(per model, all downloads)`` in MB: ``WORKBENCH_HUB_MAX_MB`` (1024), ``WORKBENCH_HUB_CACHE_MB`` (4096)."""
    return checks.env_limit(HUB_MAX_ENV, 1024), checks.env_limit(HUB_CACHE_ENV, 4096)


def _watched(fn, monitor, what: str):
    """``fn()`` on a helper thread, watched: its result (or its exception), or :class:`Stopped` as soon as the
    monitor says stop. A request hanging on a dead Hub then holds no job slot: the helper thread is left to
    end at its own timeout."""
    box, done = {}, threading.Event()

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the waiting thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name=f"workbench-open: {what[:60]}").start()
    while not done.wait(0.1):
        if monitor.stopped:
            raise Stopped(f"{what}: stopped")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed: each blob once)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode):
                total += st.st_size
    return total


def hub_files(name: str, revision: str | None = None, *, monitor=None) -> tuple[str, dict]:
    """``(commit sha, {file: size in bytes or None})`` of a Hub model, from the Hub's file listing (one request,
    ``HfApi.model_info(files_metadata=True)`` at ``$HF_ENDPOINT``, at most :data:`HUB_TIMEOUT` s); stoppable."""
    from huggingface_hub import HfApi

    monitor = _monitor.resolve(monitor)
    api = HfApi(endpoint=_endpoint())
    try:
        info = _watched(lambda: api.model_info(name, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT),
                        monitor, f"{name}: the Hub's file listing")
    except Stopped:
        raise
    except Exception as e:  # noqa: BLE001 -- no network, no such model, gated, a timeout: say which
        raise ValueError(f"Hub name {name!r}: cannot read its file listing from the Hub ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    return str(info.sha), {s.rfilename: getattr(s, "size", None) for s in (info.siblings or [])}


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None   # read now (huggingface_hub reads it once, at import)


def plan_download(name: str, files: dict) -> list[str]:
    """The files to fetch of a Hub model listed as ``files``: its config, tokenizer files and safetensors
    weights (never a pickle checkpoint). ``ValueError`` when it has no config or no safetensors weights."""
    top = {f for f in files if "/" not in f}
    if "config.json" not in top:
        raise ValueError(f"Hub name {name!r}: the model has no config.json")
    if "model.safetensors" in top:
        weights = ["model.safetensors"]
    elif "model.safetensors.index.json" in top:
        weights = ["model.safetensors.index.json"] + sorted(f for f in top if f.endswith(".safetensors"))
    else:
        raise ValueError(f"Hub name {name!r}: the model has no safetensors weights (model.safetensors); the "
                         "workbench does not read pickle checkpoints (pytorch_model.bin)")
    return ["config.json"] + [f for f in _HUB_EXTRA if f in top] + weights


def check_download(name: str, files: dict, plan: list[str], hub_root, present=()) -> int:
    """Refuse a download over the caps, before anything is fetched; returns its size in bytes.

    ``files``: the Hub's listing (sizes); ``plan``: what would be fetched; ``present``: files of ``plan``
    already on disk (not fetched again); ``hub_root``: the folder every dashboard download lives in (its
    current size counts against ``WORKBENCH_HUB_CACHE_MB``).
    """
    per_model, total_cap = hub_limits()
    unknown = [f for f in plan if not isinstance(files.get(f), int)]
    if unknown:
        raise ValueError(f"Hub name {name!r}: the Hub gave no size for {unknown[:3]}; not downloaded (the size "
                         f"is checked against {HUB_MAX_ENV} first)")
    size = sum(files[f] for f in plan)
    if size > per_model * 2**20:
        raise ValueError(f"Hub name {name!r}: the model's files are {_models._fmt_bytes(size)}, more than the "
                         f"limit of {per_model:g} MB for one download ({HUB_MAX_ENV})")
    new = sum(files[f] for f in plan if f not in set(present))
    used = _dir_bytes(Path(hub_root)) if Path(hub_root).is_dir() else 0
    if used + new > total_cap * 2**20:
        raise ValueError(f"Hub name {name!r}: downloading {_models._fmt_bytes(new)} would take the dashboard's "
                         f"downloads to {_models._fmt_bytes(used + new)}, more than the limit of {total_cap:g} MB "
                         f"({HUB_CACHE_ENV}); ask the teacher to make room")
    return size


def _repo_folder(name: str) -> str:
    return "models--" + name.replace("/", "--")


def _local_snapshot(name: str, caches: list[Path]) -> Path | None:
    """The newest complete snapshot of ``name`` (its ``refs/main`` one first) in one of ``caches``, or None."""
    for cache in caches:
        folder = Path(cache) / _repo_folder(name)
        ref = folder / "refs" / "main"
        revs = [ref.read_text().strip()] if ref.is_file() else []
        snaps = folder / "snapshots"
        if snaps.is_dir():
            revs += sorted((p.name for p in snaps.iterdir()), key=lambda r: -(snaps / r).stat().st_mtime)
        for rev in revs:
            if _complete(snaps / rev):
                return snaps / rev
    return None


def _complete(snap: Path) -> bool:
    """Whether a snapshot holds a config and all its safetensors weights (every shard its index names)."""
    if not (snap / "config.json").is_file():
        return False
    if (snap / "model.safetensors").is_file():
        return True
    index = snap / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(shards) and all(isinstance(f, str) and "/" not in f and (snap / f).is_file() for f in shards)


def _download(name: str, sha: str, plan: list[str], files: dict, cache: Path, monitor) -> Path:
    """Fetch ``plan`` of ``name`` at ``sha`` into the Hugging Face cache ``cache``, file by file, stoppable;
    a file growing past its listed size is cut off (the listing is what the caps were checked against)."""
    from huggingface_hub import hf_hub_download
    from tqdm.auto import tqdm

    stop = threading.Event()

    def fetch(filename: str) -> str:
        limit = files[filename]

        class Guard(tqdm):   # hf_hub_download reports every chunk here
            seen = 0

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "disable": True})

            def update(self, n=1):
                Guard.seen += n or 0
                if stop.is_set():
                    raise Stopped(f"{name}: download stopped")
                if Guard.seen > limit:
                    raise ValueError(f"Hub name {name!r}: {filename} is larger than the Hub's listing says; "
                                     "download stopped")
                return super().update(n)

        return hf_hub_download(name, filename, revision=sha, cache_dir=str(cache), endpoint=_endpoint(),
                               etag_timeout=HUB_TIMEOUT, tqdm_class=Guard)

    shards = None
    for k, filename in enumerate(plan):
        if filename.endswith(".safetensors") and shards is not None and filename not in shards:
            continue   # a sharded model: only the shards its index names
        monitor.report(progress=0.1 + 0.6 * k / len(plan),
                       message=f"downloading {name}: {filename} ({_models._fmt_bytes(files[filename])})")
        try:
            path = _watched(lambda f=filename: fetch(f), monitor, f"{name}: {filename}")
        except Stopped:
            stop.set()
            raise
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 -- the network, a full disk: say which file
            raise ValueError(f"Hub name {name!r}: downloading {filename} failed ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
        if filename == "model.safetensors.index.json":
            try:
                shards = set(json.loads(Path(path).read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                raise ValueError(f"Hub name {name!r}: model.safetensors.index.json is not a valid index") from None
    return cache / _repo_folder(name) / "snapshots" / sha
