"""Our pre-LN Transformer as a Hugging Face GPT-2 and back: :func:`to_gpt2` / :func:`export_gpt2` (a
``save_pretrained`` folder with ``workbench.json`` and a character tokenizer), :func:`load_gpt2` (a local
folder, safetensors only) and :func:`from_gpt2`. GPT-2's ``Conv1D`` stores weights as ``(in, out)``, the
transpose of ``nn.Linear``; models GPT-2 cannot express (Peri-LN, LNS, per-block widths, a fade-in) are
refused.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ...core import models as _models
from ...hooks.adapters.hf_gpt2 import is_gpt2

# ============================================================================ export / import


EXPORT_META = "workbench.json"   # written next to config.json: our config and the vocabulary
_FORMAT = "depth-workbench-gpt2-export"


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
