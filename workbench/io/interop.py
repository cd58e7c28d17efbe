"""Hugging Face GPT-2 interop: export and import.

Our pre-LN :class:`~workbench.models.Transformer` is GPT-2 up to names: learned positions,
LayerNorm (eps 1e-5) before attention and MLP, GELU(tanh) (= GPT-2's ``gelu_new``), a final
LayerNorm and a bias-free readout. So

- :func:`to_gpt2` / :func:`export_gpt2` turn it into a ``transformers.GPT2LMHeadModel``
  (a ``save_pretrained`` directory for the latter) whose logits match ours to float
  tolerance; GPT-2's ``Conv1D`` stores weights as ``(in, out)``, the transpose of
  ``nn.Linear``; an untied readout gives ``tie_word_embeddings=False``;
- :func:`from_gpt2` goes back to a workbench Transformer;
- :func:`load_gpt2` reads a local ``save_pretrained`` directory (safetensors only);
- :func:`load_hf` reads any supported decoder family (GPT-2, GPT-NeoX/Pythia, Llama, Mistral,
  Qwen2, Qwen3, Gemma, Phi) from a local directory or, when online, the Hub, within the memory budget.

Reading a GPT-2 model with the residual-stream tools is the adapter's job:
:class:`~workbench.adapters.hf_gpt2.GPT2Adapter` (hook sites on GPT-2's own modules under our
hook names) lives in :mod:`workbench.adapters.hf_gpt2`; ``GPT2Adapter`` and ``is_gpt2`` are
re-exported here for old imports.

Peri-LN models (a LayerNorm after each sublayer), residual MLPs and blocks in the middle of
a fade-in (``residual_scale != 1``) have no GPT-2 equivalent: exporting them raises
``ValueError``. Only :func:`load_hf` given a Hub name downloads anything; loading reads only
safetensors weights (a pickle checkpoint, ``pytorch_model.bin``, is never unpickled).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core import checks
from ..core import models as _models
from ..core import monitor as _monitor
from ..hooks.adapters.hf_gpt2 import GPT2Adapter, is_gpt2   # re-exported: they live in workbench/adapters/hf_gpt2.py

__all__ = ["is_gpt2", "GPT2Adapter", "to_gpt2", "export_gpt2", "from_gpt2", "load_gpt2", "load_hf", "EXPORT_META",
           "SAFETENSORS_FILES", "open_model", "OpenModel", "ModelCache", "MODELS", "Stopped", "hub_allowed",
           "check_hub_name", "hub_files", "plan_download", "check_download", "hub_limits", "tokenizer_vocab"]

EXPORT_META = "workbench.json"   # written next to config.json: our config and the vocabulary
_FORMAT = "depth-workbench-gpt2-export"


# ============================================================================ export / import


@contextlib.contextmanager
def _quiet():
    """No transformers progress bars while we save or load small local checkpoints."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _linear_to_conv(w: torch.Tensor) -> torch.Tensor:
    return w.detach().t().contiguous()


def _check_exportable(model) -> None:
    if not isinstance(model, _models.Transformer):
        raise ValueError(f"only workbench Transformers can be exported to GPT-2, got {type(model).__name__}")
    cfg = model.config
    if cfg.norm != "pre":
        why = ("GPT-2 blocks have no LayerNorm after the attention and MLP outputs (Peri-LN)" if cfg.norm == "peri"
               else "GPT-2 blocks have no 1/sqrt(l) LayerNorm Scaling" if cfg.norm == "lns"
               else "GPT-2 blocks always normalise the input of attention and MLP")
        raise ValueError(f"a norm={cfg.norm!r} model cannot be exported to GPT-2: {why}; only norm='pre' models "
                         "export exactly")
    if getattr(cfg, "layer_widths", None) is not None:
        raise ValueError(f"a model whose blocks have different MLP widths (layer_widths={cfg.layer_widths}) cannot be "
                         "exported to GPT-2: GPT-2 has one n_inner for every block")
    fading = [i for i, b in enumerate(model.blocks) if float(b.residual_scale) != 1.0]
    if fading:
        raise ValueError(f"blocks {fading} are fading in (residual_scale != 1); finish the fade before exporting")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        raise ValueError(f"GPT-2 uses one LayerNorm eps; this model has {sorted(eps)}")


def to_gpt2(model: _models.Transformer):
    """A ``transformers.GPT2LMHeadModel`` computing the same function as ``model`` (eval mode,
    dropout 0, same device and dtype). Raises ``ValueError`` for models GPT-2 cannot express."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _check_exportable(model)
    cfg = model.config
    eps = model.final_norm.eps
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=cfg.d_model, n_layer=len(model.blocks),
        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function="gelu_new", layer_norm_epsilon=eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=bool(cfg.tie_embeddings),
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    p = next(model.parameters())
    hf = GPT2LMHeadModel(hf_cfg).to(device=p.device, dtype=p.dtype)
    tf = hf.transformer
    with torch.no_grad():
        tf.wte.weight.copy_(model.tok_embed.weight)
        tf.wpe.weight.copy_(model.pos_embed.weight)
        for blk, h in zip(model.blocks, tf.h):
            h.ln_1.weight.copy_(blk.ln1.weight), h.ln_1.bias.copy_(blk.ln1.bias)
            h.attn.c_attn.weight.copy_(_linear_to_conv(blk.attn.qkv.weight)), h.attn.c_attn.bias.copy_(blk.attn.qkv.bias)
            h.attn.c_proj.weight.copy_(_linear_to_conv(blk.attn.proj.weight)), h.attn.c_proj.bias.copy_(blk.attn.proj.bias)
            h.ln_2.weight.copy_(blk.ln2.weight), h.ln_2.bias.copy_(blk.ln2.bias)
            h.mlp.c_fc.weight.copy_(_linear_to_conv(blk.mlp.fc.weight)), h.mlp.c_fc.bias.copy_(blk.mlp.fc.bias)
            h.mlp.c_proj.weight.copy_(_linear_to_conv(blk.mlp.proj.weight)), h.mlp.c_proj.bias.copy_(blk.mlp.proj.bias)
        tf.ln_f.weight.copy_(model.final_norm.weight), tf.ln_f.bias.copy_(model.final_norm.bias)
        if cfg.tie_embeddings:
            if hf.lm_head.weight.data_ptr() != tf.wte.weight.data_ptr():
                hf.lm_head.weight = tf.wte.weight
        else:
            hf.lm_head.weight.copy_(model.readout.weight)
    return hf.eval()


def export_gpt2(model: _models.Transformer, path, vocab: list[str] | None = None, dataset: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 directory (``save_pretrained`` layout, safetensors).

    Also writes ``workbench.json`` (our config, the vocabulary and the dataset spec, so that a
    page can encode text for it) and, when the vocabulary is known, a character-level
    tokenizer (``tokenizer.json``) so that ``AutoTokenizer`` and TransformerLens can load the
    directory on their own. Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = to_gpt2(model)
    with _quiet():
        hf.save_pretrained(path)
    vocab = list(vocab) if vocab is not None else (list(model.config.vocab) if model.config.vocab else None)
    meta = {"format": _FORMAT, "model": _models.config_to_dict(model.config), "vocab": vocab, "dataset": dataset}
    (path / EXPORT_META).write_text(json.dumps(meta, indent=2, default=str))
    if vocab is not None:
        _save_char_tokenizer(vocab, path)
    return path


def _save_char_tokenizer(vocab: list[str], path: Path) -> None:
    """A character-level ``PreTrainedTokenizerFast`` (one token per vocabulary entry)."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # tokenizers ships with transformers; without it the weights still load
        return
    if len(set(vocab)) != len(vocab) or any(len(t) != 1 for t in vocab):
        return  # not a character vocabulary: leave tokenisation to workbench.json's vocab
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(path)


SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")   # single file or sharded


def _no_safetensors_message(path: Path) -> str:
    return (f"{path} has no safetensors weights (model.safetensors); the workbench does not read pickle "
            "checkpoints (pytorch_model.bin). Convert it with the Hugging Face 'Convert to Safetensors' Space, or "
            "where you trust the file: transformers.AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)")


def load_gpt2(path):
    """``(GPT2LMHeadModel, meta)`` from a local directory; ``meta`` is ``workbench.json`` or ``{}``.

    Only reads local files (``local_files_only=True``) and only safetensors weights
    (``use_safetensors=True``): a directory holding only a pickle checkpoint
    (``pytorch_model.bin``) is refused, never unpickled. Raises ``ValueError`` with the reason
    when the directory is missing, not a GPT-2 checkpoint or has no safetensors weights.
    """
    from transformers import AutoConfig, GPT2LMHeadModel

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:   # unreadable or foreign config.json
        raise ValueError(f"{path}: unreadable config.json ({e})") from None
    if cfg.model_type != "gpt2":
        raise ValueError(f"{path}: model_type is {cfg.model_type!r}; only GPT-2-style models are supported")
    if not any((path / f).is_file() for f in SAFETENSORS_FILES):
        raise ValueError(_no_safetensors_message(path))
    try:
        with _quiet():
            model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    except OSError as e:   # e.g. a sharded index naming a missing shard
        raise ValueError(f"{path}: cannot read the safetensors weights ({e})") from None
    meta_path = path / EXPORT_META
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return model, meta


# ============================================================================ any supported decoder


DTYPES = ("float32", "float16", "bfloat16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _hub_offline() -> bool:
    """True when the Hugging Face Hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read now."""
    import os

    if any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


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

    from .. import hooks

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


def from_gpt2(hf_model) -> _models.Transformer:
    """A workbench :class:`~workbench.models.Transformer` with the weights of a GPT-2 model."""
    if not is_gpt2(hf_model):
        raise TypeError(f"expected a Hugging Face GPT2LMHeadModel, got {type(hf_model).__name__}")
    c = hf_model.config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {c.activation_function!r} differs from ours (GELU tanh)")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False) or not getattr(c, "scale_attn_weights", True):
        raise ValueError("only standard 1/sqrt(d_head) attention scaling is supported")
    if getattr(hf_model.lm_head, "bias", None) is not None:
        raise ValueError("the GPT-2 readout has a bias; ours has none")
    tf = hf_model.transformer
    tied = hf_model.lm_head.weight.data_ptr() == tf.wte.weight.data_ptr()
    cfg = _models.TransformerConfig(vocab_size=c.vocab_size, context=c.n_positions, d_model=c.n_embd,
                                    n_layers=c.n_layer, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
                                    norm="pre", tie_embeddings=tied)
    if abs(c.layer_norm_epsilon - 1e-5) > 1e-12:
        raise ValueError(f"GPT-2 layer_norm_epsilon {c.layer_norm_epsilon} differs from ours (1e-5)")
    model = _models.Transformer(cfg)
    with torch.no_grad():
        model.tok_embed.weight.copy_(tf.wte.weight)
        model.pos_embed.weight.copy_(tf.wpe.weight)
        for blk, h in zip(model.blocks, tf.h):
            blk.ln1.weight.copy_(h.ln_1.weight), blk.ln1.bias.copy_(h.ln_1.bias)
            blk.attn.qkv.weight.copy_(h.attn.c_attn.weight.t()), blk.attn.qkv.bias.copy_(h.attn.c_attn.bias)
            blk.attn.proj.weight.copy_(h.attn.c_proj.weight.t()), blk.attn.proj.bias.copy_(h.attn.c_proj.bias)
            blk.ln2.weight.copy_(h.ln_2.weight), blk.ln2.bias.copy_(h.ln_2.bias)
            blk.mlp.fc.weight.copy_(h.mlp.c_fc.weight.t()), blk.mlp.fc.bias.copy_(h.mlp.c_fc.bias)
            blk.mlp.proj.weight.copy_(h.mlp.c_proj.weight.t()), blk.mlp.proj.bias.copy_(h.mlp.c_proj.bias)
        model.final_norm.weight.copy_(tf.ln_f.weight), model.final_norm.bias.copy_(tf.ln_f.bias)
        if not tied:
            model.readout.weight.copy_(hf_model.lm_head.weight)
    p = next(hf_model.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()


# ============================================================================ opening a model for the dashboard
#
# The dashboard opens a Hugging Face model in a page's job, never on the server's event loop:
# open_model is the one call (a model folder under the roots, or a Hub name), with the policy that used to
# live in the Residual page. Hub names are opt-in on a class server (hub_allowed), downloads are capped
# per model and in total before anything is fetched, and every opened model sits in one process-wide,
# memory-bounded cache (MODELS) that all sessions share.

ALLOW_HUB_ENV = "WORKBENCH_ALLOW_HUB"        # "1": signed-in users may name Hub models
HUB_MAX_ENV = "WORKBENCH_HUB_MAX_MB"         # largest download of one model (default 1024)
HUB_CACHE_ENV = "WORKBENCH_HUB_CACHE_MB"     # the dashboard's downloads on disk, all users (default 4096)
MODEL_CACHE_ENV = "WORKBENCH_MODEL_CACHE_MB"  # memory of the shared cache of opened models (default 2048)
HUB_TIMEOUT = 20.0                           # seconds a request to the Hub may take
HUB_REFUSED = ("Hub name: Hub models are switched off on this class server; pick a model from the model folders "
               "(the teacher can allow Hub names: classroom serve --allow-hub, WORKBENCH_ALLOW_HUB=1)")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_HUB_EXTRA = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


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


def tokenizer_vocab(tokenizer) -> list[str] | None:
    """Token strings by id (for labels), or None without a tokenizer."""
    if tokenizer is None:
        return None
    return list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


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
    from . import model_roots as _roots

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
