"""Any supported Hugging Face decoder (GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Qwen3, Gemma, Phi):
:func:`load_hf` from a local folder or a Hub name, safetensors only, no remote code, the memory budget
checked on a weightless (meta) build before any weight is read; the device and dtype checks; a
tokenizer's vocabulary as token strings.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...core import checks
from ...core import models as _models
from .gpt2 import SAFETENSORS_FILES, _no_safetensors_message, _quiet
from .hub import _hub_offline

# ============================================================================ any supported decoder


DTYPES = ("float32", "float16", "bfloat16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")




def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {device!r}: no CUDA device is available here; use 'cpu'")
        if dev.index is not None and not 0 <= dev.index < n:
            raise ValueError(f"device must be a CUDA index in [0, {n - 1}], got {device!r}")
        return dev
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r}: MPS is not available here; use 'cpu'")
        return dev
    raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")


def _config_dtype(cfg) -> torch.dtype:
    """The dtype the checkpoint is stored in (``config.dtype`` / ``torch_dtype``), float32 when it names none."""
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d.replace("torch.", ""), None)
    return d if d in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _safetensors_error() -> type:
    try:
        from safetensors import SafetensorError
        return SafetensorError
    except ImportError:
        return OSError


def _count_params(cfg) -> int:
    """Exact parameter count of the causal LM ``cfg`` describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in shell.parameters())   # tied weights counted once


def load_hf(name_or_directory, dtype: str | None = None, device=None):
    """``(model, tokenizer)``: a Hugging Face causal LM of a supported family, in eval mode.

    ``name_or_directory``: a local ``save_pretrained`` directory (read offline:
    ``local_files_only=True``), or a Hub name such as ``"EleutherAI/pythia-70m"`` (downloaded
    when online; with ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is read). Weights are
    read from safetensors only (``use_safetensors=True``; a pickle checkpoint is refused, never
    unpickled) and no remote code runs.

    ``config.model_type`` must be one a workbench adapter reads
    (:func:`workbench.hooks.hf_model_types`: gpt2, gpt_neox, llama, mistral, qwen2, qwen3, gemma,
    phi), else ``ValueError`` listing them. ``dtype``: ``None`` (the checkpoint's own dtype, float32
    when the config names none), ``"float32"``, ``"float16"`` or ``"bfloat16"``. ``device``:
    ``None`` (cpu), ``"cpu"``, ``"cuda[:N]"`` or ``"mps"``, validated.

    Memory: the config is read first and the parameter count taken from a weightless (meta)
    build; a model whose weights (``params x bytes per dtype``) exceed ``WORKBENCH_MAX_MODEL_MB``
    is refused before any weight is read. ``tokenizer`` is the model's own
    (``AutoTokenizer``), or ``None`` for a directory that holds no tokenizer files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ... import hooks

    if isinstance(name_or_directory, Path) or hasattr(name_or_directory, "__fspath__"):
        name_or_directory = str(Path(name_or_directory))
    src = checks.check_str("name_or_directory", name_or_directory, 1000)
    if dtype is not None:
        checks.check_choice("dtype", dtype, DTYPES)
    dev = _check_device(device)
    path = Path(src).expanduser()
    local = path.is_dir()
    if not local:
        if path.exists() or src.startswith(("/", ".", "~")) or src.count("/") > 1 or "\\" in src:
            raise ValueError(f"name_or_directory {src!r}: no such model directory")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", src):
            raise ValueError(f"name_or_directory must be a model directory or a Hub name 'owner/name', got {src!r}")
    offline = local or _hub_offline()
    where = str(path) if local else src
    if local and not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(str(path) if local else src, local_files_only=offline)
    except (OSError, ValueError, KeyError) as e:
        if local:
            raise ValueError(f"{path}: unreadable config.json ({e})") from None
        if offline:
            raise ValueError(f"{src!r}: not a local directory, and not in the Hugging Face cache while the Hub is "
                             "offline (HF_HUB_OFFLINE); pass a directory holding config.json and safetensors "
                             "weights, or go online") from None
        raise ValueError(f"{src!r}: cannot read its config from the Hugging Face Hub ({e})") from None
    supported = hooks.hf_model_types()
    if cfg.model_type not in supported:
        raise ValueError(f"{where}: model_type {cfg.model_type!r} is not supported; supported model types: "
                         f"{', '.join(supported)}")
    if local and not any((path / f).is_file() for f in SAFETENSORS_FILES):
        raise ValueError(_no_safetensors_message(path))
    torch_dtype = getattr(torch, dtype) if dtype is not None else _config_dtype(cfg)
    n = _count_params(cfg)
    nbytes = n * torch.empty((), dtype=torch_dtype).element_size()
    limit = _models.max_model_mb()
    if nbytes > limit * 2**20:
        raise ValueError(f"{where}: the model is too large: {n:,} parameters in {str(torch_dtype).split('.')[-1]} "
                         f"are {_models._fmt_bytes(nbytes)} of weights, more than the limit of {limit:g} MB "
                         "(WORKBENCH_MAX_MODEL_MB)")
    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(str(path) if local else src, config=cfg,
                                                         local_files_only=offline, use_safetensors=True,
                                                         dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError, _safetensors_error()) as e:   # a missing shard, a corrupt file,
        raise ValueError(f"{where}: cannot read the safetensors weights ({e})") from None   # none on the Hub
    model = model.to(dev).eval()
    tokenizer = None
    if not local or any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path) if local else src, local_files_only=offline)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{where}: cannot read the tokenizer ({e})") from None
    return model, tokenizer


def tokenizer_vocab(tokenizer) -> list[str] | None:
    """Token strings by id (for labels), or None without a tokenizer."""
    if tokenizer is None:
        return None
    return list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
