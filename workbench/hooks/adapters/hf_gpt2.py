"""Hugging Face GPT-2 (``GPT2LMHeadModel``): GPT-2's own modules under the workbench's hook names.

Registered for ``config.model_type == "gpt2"``. Nothing here imports ``transformers``: the
adapter only reads the model it is given.
"""
from __future__ import annotations

import torch.nn as nn

from .. import Adapter, register_adapter

__all__ = ["GPT2Adapter", "is_gpt2"]


def is_gpt2(model) -> bool:
    """True for a Hugging Face GPT-2 language model (``GPT2LMHeadModel``-shaped)."""
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) == "gpt2" and hasattr(model, "lm_head")
            and hasattr(getattr(model, "transformer", None), "h"))


class GPT2Adapter(Adapter):
    """Maps a ``GPT2LMHeadModel``'s modules onto the workbench hook names with forward hooks.

    ``embed_out`` = ``wte`` output; ``pos_embed_out`` = ``wpe`` output; ``blocks.l.resid_pre``
    = block input; ``attn_out`` = attention output; ``resid_mid`` = input of ``ln_2``;
    ``mlp_out`` = MLP output; ``resid_post`` = block output; ``attn.z`` = input of
    ``attn.c_proj`` as ``(B, T, H, D)``; ``features`` = ``ln_f`` output.
    """

    family = "transformer"

    def __init__(self, model: nn.Module):
        if not is_gpt2(model):
            raise TypeError(f"expected a Hugging Face GPT2LMHeadModel, got {type(model).__name__}")
        if getattr(model.config, "add_cross_attention", False):
            raise ValueError("GPT-2 models with cross-attention are not supported")
        self.model = model
        self.tf = model.transformer
        self.n_layers = len(self.tf.h)
        self.n_heads = int(model.config.n_head)
        self._names = ["embed_out", "pos_embed_out"]
        for i in range(self.n_layers):
            self._names += [f"blocks.{i}.{s}" for s in ("resid_pre", "attn.z", "attn_out", "resid_mid", "mlp_out",
                                                        "resid_post")]
        self._names.append("features")

    def site_names(self):
        return list(self._names)

    def add_hook(self, name, fn):
        tf = self.tf

        def first(out):
            return out[0] if isinstance(out, tuple) else out

        if name == "embed_out":
            return tf.wte.register_forward_hook(lambda m, a, out: fn(out))
        if name == "pos_embed_out":
            return tf.wpe.register_forward_hook(
                lambda m, a, out: fn(out[0] if out.dim() == 3 and out.shape[0] == 1 else out))
        if name == "features":
            return tf.ln_f.register_forward_hook(lambda m, a, out: fn(out))
        parts = name.split(".")
        if parts[0] != "blocks" or name not in self._names:
            raise KeyError(f"no hook site {name!r}")
        block = tf.h[int(parts[1])]
        site = ".".join(parts[2:])
        if site == "resid_pre":
            return block.register_forward_pre_hook(
                lambda m, args, kwargs: fn(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        if site == "attn_out":
            return block.attn.register_forward_hook(lambda m, a, out: fn(first(out)))
        if site == "resid_mid":
            return block.ln_2.register_forward_pre_hook(lambda m, args: fn(args[0]))
        if site == "mlp_out":
            return block.mlp.register_forward_hook(lambda m, a, out: fn(first(out)))
        if site == "resid_post":
            return block.register_forward_hook(lambda m, a, out: fn(first(out)))
        if site == "attn.z":
            H = self.n_heads

            def pre(m, args):
                z = args[0]
                fn(z.view(*z.shape[:-1], H, z.shape[-1] // H))
            return block.attn.c_proj.register_forward_pre_hook(pre)
        raise KeyError(f"no hook site {name!r}")

    def replace_hook(self, name, fn):
        """Replace site ``blocks.l.attn_out`` or ``blocks.l.mlp_out`` by ``fn(activation)``; a removable handle."""
        from .hf_common import replace_output_hook
        return replace_output_hook(self._names, name, lambda layer, site: getattr(
            self.tf.h[layer], "attn" if site == "attn_out" else "mlp"), fn)

    def watch_patterns(self, fn, layers):
        """Attention weights from ``transformers``' eager attention (:func:`.hf_common.eager_patterns`)."""
        from .hf_common import eager_patterns
        return eager_patterns(self.model, {l: self.tf.h[l].attn for l in layers}, fn)

    def forward(self, x):
        return self.model(input_ids=x).logits

    def final_norm(self):
        return self.tf.ln_f

    def readout(self):
        head = self.model.lm_head
        return head.weight, getattr(head, "bias", None)

    def block(self, layer):
        return self.tf.h[layer]

    def head_projection(self, layer):
        proj = self.tf.h[layer].attn.c_proj           # Conv1D: weight (C_in, C_out)
        C = proj.weight.shape[1]
        H = self.n_heads
        return proj.weight.view(H, C // H, C), proj.bias


is_gpt2.label = "Hugging Face gpt2 (GPT2LMHeadModel)"
is_gpt2.model_types = frozenset({"gpt2"})   # listed by workbench.hooks.hf_model_types
register_adapter(is_gpt2, GPT2Adapter)
