"""The one dataset type, :class:`Dataset` (tensors of both splits, the vocabulary, the options it was
built with), and :class:`Shape`, what a dataset's options fix about it without generating it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checks import register_dataset

IGNORE = -100


def encode_text(text: str, vocab, field: str = "text") -> torch.Tensor:
    """Text -> token ids ``(T,)`` int64, one per character of ``vocab`` (the token strings by id; a
    character-level vocabulary). Characters outside it raise ``ValueError`` naming ``field``."""
    index = {t: i for i, t in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        raise ValueError(f"{field}: characters not in the vocabulary: {unknown[:10]}")
    return torch.tensor([index[c] for c in text], dtype=torch.long)


@dataclass
class Dataset:
    name: str
    kind: str                   # "vector" or "sequence"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int              # classes (vector) or vocabulary size (sequence)
    description: str
    vocab: list[str] | None = None      # token strings (sequence datasets)
    options: dict = field(default_factory=dict)  # the options it was built with

    @property
    def vocab_size(self) -> int:
        return self.n_classes

    @property
    def d_in(self) -> int:
        """Input features (vector data) or sequence length (sequence data)."""
        return self.x_train.shape[1]

    @property
    def seq_len(self) -> int:
        return self.x_train.shape[1]

    @property
    def sequence_length(self) -> int | None:
        """Positions per example of sequence data; ``None`` for vector data (what FLOP counts take)."""
        return self.x_train.shape[1] if self.kind == "sequence" else None

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"`` or ``"val"``."""
        if split == "train":
            return self.x_train, self.y_train
        if split == "val":
            return self.x_val, self.y_val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def spec(self) -> dict:
        """What :func:`from_spec` needs to rebuild this dataset (stored with runs; JSON-ready).

        A text dataset stores its content (at most ``WORKBENCH_MAX_UPLOAD_MB``), never a path.
        """
        return {"name": self.name, **self.options}

    def decode(self, tokens) -> str:
        """Token ids -> text (sequence datasets)."""
        if self.vocab is None:
            raise ValueError(f"dataset {self.name!r} has no vocabulary")
        return "".join(self.vocab[int(t)] if int(t) >= 0 else "" for t in tokens)

    def encode(self, text: str) -> torch.Tensor:
        """Text -> token ids; characters outside the vocabulary raise ``ValueError``."""
        if self.vocab is None:
            raise ValueError(f"dataset {self.name!r} has no vocabulary")
        return encode_text(text, self.vocab)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, kind={self.kind!r}, train={tuple(self.x_train.shape)}, "
                f"val={tuple(self.x_val.shape)}, classes={self.n_classes})")


register_dataset(Dataset)   # checks.check_dataset's "a workbench Dataset"


@dataclass(frozen=True)
class Shape:
    """What a dataset's options fix about it, known without generating it (:func:`shape_of`).

    The attributes a model config reads from a :class:`Dataset` (``kind``, ``d_in``, ``n_classes`` /
    ``vocab_size``, ``seq_len``, ``vocab``), so :func:`workbench.models.config_for` takes either; plus
    the sizes of the splits. ``d_in`` is the input features (vector data) or the sequence length
    (sequence data), as on :class:`Dataset`.
    """

    name: str
    kind: str                   # "vector" or "sequence"
    d_in: int                   # features (vector) or positions per sequence (sequence)
    n_classes: int              # classes (vector) or vocabulary size (sequence)
    n_train: int                # examples (vector) or sequences (sequence) of the train split
    n_val: int
    vocab: tuple[str, ...] | None = None    # token strings (sequence datasets)

    @property
    def vocab_size(self) -> int:
        return self.n_classes

    @property
    def seq_len(self) -> int:
        return self.d_in

    @property
    def sequence_length(self) -> int | None:
        return self.d_in if self.kind == "sequence" else None
