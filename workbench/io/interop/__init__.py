"""Hugging Face interop: GPT-2 export and import, any supported decoder, and opening models for the dashboard.

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

The dashboard opens models with :func:`open_model` (a model folder under the roots, or a Hub name when
allowed, downloads capped before anything is fetched) into :data:`MODELS`, the one cache of opened models.

Files: ``gpt2`` (export and import of our models as GPT-2), ``hf`` (:func:`load_hf`, devices, dtypes,
tokenizers), ``hub`` (Hub names, allow, limits, listings, download plans and downloads), ``opening``
(:func:`open_model`, :class:`OpenModel`, :class:`ModelCache`, :data:`MODELS`).
"""
from __future__ import annotations

from ...hooks.adapters.hf_gpt2 import GPT2Adapter, is_gpt2   # re-exported: they live in workbench/hooks/adapters/
from .gpt2 import to_gpt2, export_gpt2, from_gpt2, load_gpt2, EXPORT_META, SAFETENSORS_FILES
from .hf import load_hf, tokenizer_vocab, DTYPES  # noqa: F401 (interop.DTYPES, as before)
from .hub import Stopped, hub_allowed, check_hub_name, hub_files, plan_download, check_download, hub_limits
from .hub import ALLOW_HUB_ENV, HUB_MAX_ENV, HUB_CACHE_ENV, HUB_TIMEOUT, HUB_REFUSED  # noqa: F401 (as before)
from .opening import open_model, OpenModel, ModelCache, MODELS, MODEL_CACHE_ENV  # noqa: F401 (as before)

__all__ = ["is_gpt2", "GPT2Adapter", "to_gpt2", "export_gpt2", "from_gpt2", "load_gpt2", "load_hf", "EXPORT_META",
           "SAFETENSORS_FILES", "open_model", "OpenModel", "ModelCache", "MODELS", "Stopped", "hub_allowed",
           "check_hub_name", "hub_files", "plan_download", "check_download", "hub_limits", "tokenizer_vocab"]
