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
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from . import checks
from . import models as _models
from .adapters.hf_gpt2 import GPT2Adapter, is_gpt2   # re-exported: they live in workbench/adapters/hf_gpt2.py

__all__ = ["is_gpt2", "GPT2Adapter", "to_gpt2", "export_gpt2", "from_gpt2", "load_gpt2", "load_hf", "EXPORT_META",
           "SAFETENSORS_FILES"]

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

    from . import hooks

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
