"""Files that survive a kill: atomic writes (temporary file, ``fsync``, ``os.replace``, ``fsync`` of the
directory), the junk a killed writer leaves and when it is stale, and a run's weights as safetensors
(tied tensors stored once, read back against the model's config; never pickle).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from .names import FORMAT, StoreError

# ============================================================================ durable writes


STALE_TMP_SECONDS = 15 * 60   # a temporary file or directory of an unknown writer untouched this long is junk
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
_TAG = re.compile(r"(\d+)@([A-Za-z0-9._-]+)@")   # "<pid>@<host>@" in temporary names


def _writer_tag() -> str:
    """``<pid>@<host>@``: who is writing a temporary file (read back by :func:`_is_stale`)."""
    return f"{os.getpid()}@{_HOST}@"


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file's (or a directory's entries') data to disk. Directories: POSIX only."""
    if directory and os.name == "nt":
        return  # Windows cannot open a directory for fsync; NTFS journals renames itself
    fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory (write, fsync), rename it over ``path``,
    then fsync the directory so that the rename itself survives a power cut."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync(path.parent, directory=True)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it on Windows: leave the call to the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists (another user's process)
        return True
    return True


def _last_touched(path: Path) -> float:
    """Newest mtime of ``path`` and (for a directory) its entries."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(OSError):
            times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def _is_stale(path: Path, now: float) -> bool:
    """A temporary file or directory whose writer is gone: a dead pid on this host, or else
    (another host, no tag) nothing changed for :data:`STALE_TMP_SECONDS`."""
    m = _TAG.search(path.name)
    if m and m.group(2) == _HOST and not _pid_alive(int(m.group(1))):
        return True
    try:
        return now - _last_touched(path) > STALE_TMP_SECONDS
    except FileNotFoundError:
        return False  # removed meanwhile by its writer or another store


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ============================================================================ weights


def _frozen_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that do not train (``requires_grad=False``): frozen blocks, embeddings, substrate.

    ``requires_grad`` is not part of a state dict, so run.json carries it; :meth:`RunStore.load` applies it."""
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def _apply_frozen(model: torch.nn.Module, names: list[str], where: str) -> None:
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise StoreError(f"{where}: field 'frozen': not parameters of the model: {unknown[:5]}")
    for n in names:
        params[n].requires_grad_(False)


def _write_weights(path: Path, model: torch.nn.Module, state: dict) -> None:
    from safetensors.torch import save_file

    # Tied weights appear twice in the state dict; safetensors stores each tensor once.
    seen, unique = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key in seen:
            continue
        seen[key] = k
        unique[k] = v.clone()
    atomic_write(path, lambda p: save_file(unique, p, metadata={"format": FORMAT}))


def _read_weights(path: Path, model: torch.nn.Module, where: str, allow_nonfinite: bool = False,
                  diverged: bool = False) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise StoreError(f"{where}: {path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StoreError(f"{where}: {path}: not a readable safetensors file (truncated or foreign): {e}") from None
    expected = model.state_dict()
    optional = model.optional_state_keys() if hasattr(model, "optional_state_keys") else set()
    shared = {k for k in expected if k not in tensors and k not in optional}   # old files lack the fade gates
    # Keys left out at save time must be tied aliases of a stored tensor.
    for k in shared:
        if not any(expected[k] is expected[j] or expected[k].data_ptr() == expected[j].data_ptr()
                   for j in tensors if j in expected):
            raise StoreError(f"{where}: {path}: weights do not match the config: missing {k!r}")
    extra = set(tensors) - set(expected)
    if extra:
        raise StoreError(f"{where}: {path}: weights do not match the config: unexpected {sorted(extra)[:5]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise StoreError(f"{where}: {path}: weights do not match the config: {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
        if v.dtype.is_floating_point != expected[k].dtype.is_floating_point or v.is_complex():
            raise StoreError(f"{where}: {path}: weights do not match the config: {k} has dtype {v.dtype}, "
                             f"expected {expected[k].dtype}")
        if not allow_nonfinite and v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
            why = "the run diverged; " if diverged else ""
            raise StoreError(f"{where}: {path}: weights contain NaN or infinite values in {k!r} ({why}pass "
                             "allow_nonfinite=True to load them anyway)")
    model.load_state_dict(tensors, strict=False)
    if hasattr(model, "check_gates"):
        try:
            model.check_gates()
        except ValueError as e:
            raise StoreError(f"{where}: {path}: {e}") from None
