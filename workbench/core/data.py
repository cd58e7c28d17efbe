"""Offline datasets behind one type, :class:`Dataset`.

``load(name, **options)`` builds a dataset deterministically from its options (a
``seed`` among them) without touching the network or any global RNG:

- ``digits``: scikit-learn's bundled 8x8 digits (1797), standardised with train statistics.
- ``mnist1d``: MNIST-1D generated locally by the ``mnist1d`` package (4000 train / 1000 val).
- ``khop``: k-hop pointer chasing; the answer needs ``hops`` sequential look-ups.
- ``modadd``: ``a + b mod p`` (the grokking task of Power et al. 2022).
- ``text``: character-level language modelling of a given text (``text=`` the content, as
  the dashboard's upload sends it, or ``path=`` a file a notebook user reads) or of a
  built-in corpus (``corpus="grammar"``, ``"arithmetic"`` or ``"code"``); at most
  ``WORKBENCH_MAX_UPLOAD_MB`` (default 2) MB of text.

Vector datasets hold ``x (N, d_in) float32`` and ``y (N,) int64``. Sequence datasets hold
``x (N, T) int64`` tokens and ``y (N, T) int64`` targets, ``IGNORE = -100`` where a position
is not scored (khop and modadd score only the answer positions).

Every option is checked (type, range) with a message naming it; ``None`` is accepted only
where it is a documented value (the ``text`` dataset's ``path``, ``text``, ``vocab`` and
``corpus``: "not given"). :meth:`Dataset.spec` is JSON-ready and never names a server path
(a text read from a file stores its content); :func:`from_spec` rebuilds a dataset from it.

Definitions of the tasks: ``docs/definitions.md#datasets`` (``#khop``, ``#modadd``, ``#mnist1d``).
"""
from __future__ import annotations

import math
import numbers
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checks import SEED_MAX, check_bool, check_choice, env_limit

__all__ = ["Dataset", "Shape", "load", "from_spec", "check_spec", "check_options", "names", "options_spec", "kind_of",
           "shape_of", "IGNORE", "grammar_corpus", "CORPORA", "max_text_bytes"]

IGNORE = -100
TEXT_SOURCES = ("path", "text", "corpus")  # the text dataset takes exactly one
PATH_REFUSED = "text datasets from the dashboard come by upload, not as a server path"
MAX_VOCAB_CHARS = 2**20     # the text dataset's vocab option (models.VOCAB_MAX tokens)
MAX_PARTS = 64              # parts of a concatenated dataset's spec
MAX_NESTING = 4             # concatenations of concatenations: at most this many levels


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
        index = {t: i for i, t in enumerate(self.vocab)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise ValueError(f"text: characters not in the vocabulary: {unknown[:10]}")
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, kind={self.kind!r}, train={tuple(self.x_train.shape)}, "
                f"val={tuple(self.x_val.shape)}, classes={self.n_classes})")


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


# ----------------------------------------------------------------------------- options

# name -> {option: (default, type, low, high)}; None bounds are open. Seeds fit numpy's 32 bits.
_SPECS: dict[str, dict[str, tuple]] = {
    "digits": {"seed": (0, int, 0, SEED_MAX), "val_fraction": (0.2, float, 0.05, 0.5)},
    "mnist1d": {"seed": (42, int, 0, SEED_MAX), "num_samples": (5000, int, 100, 100_000)},
    "khop": {"hops": (2, int, 1, 8), "nodes": (12, int, 2, 52), "length": (0, int, 0, 52),
             "queries": (1, int, 1, 52), "layout": ("edges", str, None, None),
             "n_train": (20000, int, 10, 1_000_000), "n_val": (2000, int, 10, 100_000),
             "seed": (0, int, 0, SEED_MAX)},
    "modadd": {"p": (97, int, 2, 1000), "train_fraction": (0.5, float, 0.01, 0.99), "seed": (0, int, 0, SEED_MAX)},
    "text": {"path": (None, str, None, None), "text": (None, str, None, None), "context": (64, int, 2, 4096),
             "val_fraction": (0.1, float, 0.01, 0.5), "vocab": (None, str, None, None),
             "corpus_chars": (200_000, int, 1000, 10_000_000), "seed": (0, int, 0, SEED_MAX),
             "corpus": ("grammar", str, None, None)},
}
# name -> Dataset.kind: what a dataset holds, known from its name alone (the model family follows from it).
_KINDS = {"digits": "vector", "mnist1d": "vector", "khop": "sequence", "modadd": "sequence", "text": "sequence"}
# Options for which None is a documented value ("not given"); None is refused everywhere else.
_NONE_OK = {("text", "path"), ("text", "text"), ("text", "vocab"), ("text", "corpus")}


def names() -> list[str]:
    return list(_SPECS)


def options_spec(name: str) -> dict[str, tuple]:
    """``{option: (default, type, low, high)}`` for a dataset (used to build widgets)."""
    _check_name(name)
    return dict(_SPECS[name])


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"dataset must be one of {names()}, got {_short(name)}")


def kind_of(name: str) -> str:
    """``"vector"`` (features and one label per example) or ``"sequence"`` (tokens and per-position targets):
    the :attr:`Dataset.kind` of dataset ``name``, without building it."""
    _check_name(name)
    return _KINDS[name]


def max_text_bytes() -> int:
    """Largest text the ``text`` dataset takes, in bytes of UTF-8 (``WORKBENCH_MAX_UPLOAD_MB``, default 2)."""
    return int(env_limit("WORKBENCH_MAX_UPLOAD_MB", 2) * 2**20)


def _too_big(what: str, n_bytes: int) -> ValueError:
    limit = max_text_bytes()
    return ValueError(f"{what} is {n_bytes / 2**20:.2f} MB, more than the limit of {limit / 2**20:g} MB "
                      f"(WORKBENCH_MAX_UPLOAD_MB)")


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _check_option(name: str, key: str, value, typ, lo, hi):
    """One option: type first (bools are not numbers, floats not integers), then range; returns it normalised."""
    qual = f"{name}.{key}"
    rng = f"[{lo}, {'inf' if hi is None else hi}]"
    if value is None and (name, key) in _NONE_OK:
        return None
    if typ is int:
        if not isinstance(value, numbers.Integral) or _is_bool(value) or isinstance(value, torch.Tensor):
            raise ValueError(f"{qual} must be an integer in {rng}, got {value!r}")
        value = int(value)
    elif typ is float:
        if not isinstance(value, numbers.Real) or _is_bool(value) or isinstance(value, torch.Tensor) \
                or not math.isfinite(float(value)):
            raise ValueError(f"{qual} must be a number in {rng}, got {value!r}")
        value = float(value)
    else:
        return _check_str_option(name, key, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{qual} must be in {rng}, got {value!r}")
    return value


def _check_str_option(name: str, key: str, value):
    qual = f"{name}.{key}"
    if key == "layout":
        return check_choice(qual, value, KHOP_LAYOUTS)
    if key == "corpus":
        return check_choice(qual, value, sorted(CORPORA))
    if key == "path":
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{qual} must be a file path (a non-empty string) or None, got {_short(value)}")
        return value
    if key == "text":
        if isinstance(value, (bytes, bytearray)):
            raise ValueError(f"{qual} must be a string (decode the uploaded bytes as UTF-8 first), got bytes")
        if not isinstance(value, str):
            raise ValueError(f"{qual} must be a string (the text itself) or None, got {_short(value)}")
        if len(value) > max_text_bytes() or len(value.encode("utf-8", "surrogatepass")) > max_text_bytes():
            raise _too_big(qual, len(value.encode("utf-8", "surrogatepass")))
        return value
    if key == "vocab":  # a string of characters (a list of one-character strings is joined)
        if isinstance(value, (list, tuple)) and all(isinstance(c, str) and len(c) == 1 for c in value):
            value = "".join(value)
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_VOCAB_CHARS:
            raise ValueError(f"{qual} must be a string of 1 to {MAX_VOCAB_CHARS} characters (the alphabet) or "
                             f"None, got {_short(value)}")
        return value
    raise AssertionError(f"no check for the string option {qual}")  # pragma: no cover


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve_options(name: str, options: dict) -> dict:
    spec = _SPECS[name]
    unknown = set(options) - set(spec)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for dataset {name!r}; allowed: {sorted(spec)}")
    out = {}
    for key, (default, typ, lo, hi) in spec.items():
        if key in options and options[key] is None and (name, key) not in _NONE_OK:
            rng = f"[{lo}, {'inf' if hi is None else hi}]"
            kind = {int: "an integer", float: "a number"}.get(typ)
            what = f"{kind} in {rng}" if kind else (f"one of {list(KHOP_LAYOUTS)}" if key == "layout" else "given")
            raise ValueError(f"{name}.{key} must be {what}, got None (leave it out to use the default {default!r})")
        out[key] = _check_option(name, key, options.get(key, default), typ, lo, hi)
    if name == "text":
        given = [k for k in TEXT_SOURCES if options.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"text: give exactly one of path, text or corpus, got {' and '.join(given)}")
        if given and given[0] != "corpus":
            out["corpus"] = None
        elif out["corpus"] is None:
            out["corpus"] = spec["corpus"][0]  # corpus=None with no other source: the documented default
    if name == "khop":
        _check_khop_combination(out)
        _check_khop_size(out)
    return out


def _check_khop_combination(o: dict) -> None:
    if o["layout"] == "table" and o["length"] not in (0, o["nodes"]):
        raise ValueError(f"khop.length must be 0 or nodes={o['nodes']} with layout='table', got {o['length']}")
    if o["length"] > o["nodes"]:
        raise ValueError(f"khop.length must be in [1, nodes={o['nodes']}] (or 0: nodes), got {o['length']}")


def _check_khop_size(o: dict) -> None:
    """Bound the memory of the generated tensors (``WORKBENCH_MAX_DATA_MB``, default 1024)."""
    length = o["length"] or o["nodes"]
    seq = o["nodes"] + 1 + o["queries"] if o["layout"] == "table" else 2 * length + 1 + 2 * o["queries"]
    n = o["n_train"] + o["n_val"]
    need = n * (2 * 8 * seq + 16 * o["nodes"])  # x and y int64, plus the per-sequence draws
    limit = env_limit("WORKBENCH_MAX_DATA_MB", 1024)
    if need > limit * 2**20:
        raise ValueError(f"khop: {n} sequences of length {seq} need about {need / 2**20:,.0f} MB, more than "
                         f"the limit of {limit:g} MB (WORKBENCH_MAX_DATA_MB); lower n_train or n_val")


def check_options(name: str, **options) -> dict:
    """Validate options without building the data (no file is read); returns them with defaults filled in."""
    _check_name(name)
    return _resolve_options(name, options)


def load(name: str, **options) -> Dataset:
    """Build dataset ``name`` offline; see :func:`options_spec` for each one's options and ranges.

    ``None`` is refused with a message naming the option and its range, except where it is a
    documented value: the ``text`` dataset's ``path``, ``text`` and ``vocab`` (not given) and
    ``corpus`` (not given; ``"grammar"`` when neither ``path`` nor ``text`` is given either).
    The ``text`` dataset takes exactly one of ``path``, ``text`` and ``corpus``.
    """
    _check_name(name)
    opts = _resolve_options(name, options)
    return _LOADERS[name](**opts)


def shape_of(name: str, **options) -> Shape:
    """The :class:`Shape` of ``load(name, **options)`` -- input size, classes or vocabulary (with its tokens),
    sequence length, split sizes -- computed from the options alone: no tensor is generated, so a form
    can be checked and a model config built at once, whatever sizes the options ask for.

    Options are checked as :func:`load` checks them (same messages). The ``text`` dataset's vocabulary
    is the set of its characters: of the given text, or of the built-in corpus's first ``corpus_chars``
    characters (found by generating the corpus only until every character it can write has appeared).
    """
    _check_name(name)
    o = _resolve_options(name, options)
    return _SHAPES[name](o)


def _digits_shape(o: dict) -> Shape:
    n = 1797   # scikit-learn's bundled digits; train_test_split puts ceil(fraction * n) in the test split
    n_val = math.ceil(o["val_fraction"] * n)
    return Shape("digits", "vector", 64, 10, n - n_val, n_val)


def _mnist1d_shape(o: dict) -> Shape:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    n = o["num_samples"] // 10 * 10   # make_dataset draws num_samples // 10 per class
    n_train = int(n * args.train_split)
    return Shape("mnist1d", "vector", int(args.final_seq_length), 10, n_train, n - n_train)


def _khop_shape(o: dict) -> Shape:
    nodes, queries = o["nodes"], o["queries"]
    length = o["length"] or nodes
    seq = nodes + 1 + queries if o["layout"] == "table" else 2 * length + 1 + 2 * queries
    vocab = tuple(_NODE_SYMBOLS[:nodes]) + ("|", "?")
    return Shape("khop", "sequence", seq, len(vocab), o["n_train"], o["n_val"], vocab)


def _modadd_shape(o: dict) -> Shape:
    p = o["p"]
    n_train = max(1, min(p * p - 1, round(o["train_fraction"] * p * p)))
    vocab = tuple(str(i) for i in range(p)) + ("+", "=")
    return Shape("modadd", "sequence", 4, len(vocab), n_train, p * p - n_train, vocab)


def _text_shape(o: dict) -> Shape:
    if o["path"] is not None or o["text"] is not None:
        text = _read_text_file(o["path"]) if o["path"] is not None else o["text"]
        n_chars, present = len(text), set(text)
    else:
        n_chars, present = o["corpus_chars"], set(_corpus_alphabet(o["corpus"], o["corpus_chars"], o["seed"]))
    chars = sorted(present) if o["vocab"] is None else list(dict.fromkeys(o["vocab"]))
    unknown = sorted(present - set(chars))
    if unknown:
        raise ValueError(f"text.vocab: {len(unknown)} characters of the text are missing from it, e.g. {unknown[:5]}")
    context, fraction = o["context"], o["val_fraction"]
    n_val_chars = int(n_chars * fraction)
    _check_text_length(n_chars, n_val_chars, context, fraction)
    windows = lambda n: (n - (context + 1)) // context + 1   # noqa: E731 -- unfold(0, context + 1, context)
    return Shape("text", "sequence", context, len(chars), windows(n_chars - n_val_chars), windows(n_val_chars),
                 tuple(chars))


_SHAPES = {"digits": _digits_shape, "mnist1d": _mnist1d_shape, "khop": _khop_shape, "modadd": _modadd_shape,
           "text": _text_shape}


def from_spec(spec: dict, *, allow_path: bool = True) -> Dataset:
    """Rebuild a dataset from its :meth:`Dataset.spec` (the one way to rebuild the data of a stored run).

    ``allow_path=False`` (the dashboard) refuses a spec that names a file on the server;
    old specs holding ``"path": None`` are accepted. A concatenation's spec
    (``{"name": ..., "parts": [spec, ...]}``, see ``compose.concat``) rebuilds every part and
    concatenates them.
    """
    return _from_spec(spec, allow_path, 0)


def _from_spec(spec, allow_path: bool, depth: int) -> Dataset:
    name, options = _split_spec(spec, allow_path, depth)
    if "parts" in options:
        return _concat_from_spec(name, options["parts"], allow_path, depth)
    return load(name, **options)


def check_spec(spec: dict, *, allow_path: bool = True) -> dict:
    """Validate a stored dataset spec as :func:`from_spec` would, without building the data or reading a file.

    Returns the spec; raises ``ValueError`` naming what is wrong (for the run store's load).
    Combinations checked only while building (e.g. ``khop.length`` with ``layout="table"``) are left to it.
    """
    _check_spec(spec, allow_path, 0)
    return spec


def _check_spec(spec, allow_path: bool, depth: int) -> None:
    name, options = _split_spec(spec, allow_path, depth)
    if "parts" in options:
        for part in options["parts"]:
            _check_spec(part, allow_path, depth + 1)
    else:
        check_options(name, **options)


def _split_spec(spec, allow_path, depth: int = 0) -> tuple[str, dict]:
    check_bool("allow_path", allow_path)
    if not isinstance(spec, dict):
        raise ValueError(f"dataset spec must be a dict with a 'name', got {_short(spec)}")
    options = dict(spec)
    name = options.pop("name", None)
    if "parts" in options:
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise ValueError(f"dataset spec: name must be a string of 1 to 100 characters, got {_short(name)}")
        if set(options) != {"parts"}:
            raise ValueError(f"dataset spec of a concatenation takes only 'name' and 'parts', got "
                             f"{sorted(options, key=str)}")
        parts = options["parts"]
        if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTS:
            raise ValueError(f"dataset spec: parts must be a list of 1 to {MAX_PARTS} dataset specs, got "
                             f"{_short(parts)}")
        if depth >= MAX_NESTING:
            raise ValueError(f"dataset spec: concatenations may be nested at most {MAX_NESTING} deep")
        return name, options
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"dataset spec: name must be one of {names()}, got {_short(name)}")
    if options.get("path") is not None and not allow_path:
        raise ValueError(PATH_REFUSED)
    return name, options


def _concat_from_spec(name: str, parts: list, allow_path: bool, depth: int = 0) -> Dataset:
    built = [_from_spec(p, allow_path, depth + 1) for p in parts]
    first = built[0]
    for d in built[1:]:
        if d.kind != first.kind or d.n_classes != first.n_classes or d.vocab != first.vocab \
                or d.x_train.shape[1:] != first.x_train.shape[1:]:
            raise ValueError("dataset spec: the parts of a concatenation must share kind, vocabulary and shape")
    cat = lambda attr: torch.cat([getattr(d, attr) for d in built])  # noqa: E731
    return Dataset(name, first.kind, cat("x_train"), cat("y_train"), cat("x_val"), cat("y_val"), first.n_classes,
                   f"concatenation of {len(built)} datasets: " + "; ".join(d.description for d in built),
                   first.vocab, {"parts": [d.spec() for d in built]})


# ----------------------------------------------------------------------------- vector data


def _standardise(x_train: np.ndarray, x_val: np.ndarray):
    mu = x_train.mean(0, keepdims=True)
    sd = x_train.std(0, keepdims=True)
    sd[sd < 1e-8] = 1.0
    return (x_train - mu) / sd, (x_val - mu) / sd


def _vector(name, xtr, ytr, xva, yva, n_classes, description, options) -> Dataset:
    return Dataset(name, "vector", torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr, dtype=torch.long),
                   torch.tensor(xva, dtype=torch.float32), torch.tensor(yva, dtype=torch.long),
                   n_classes, description, None, options)


def _digits(seed: int, val_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    xtr, xva, ytr, yva = train_test_split(X, y, test_size=val_fraction, random_state=seed, stratify=y)
    xtr, xva = _standardise(xtr, xva)
    return _vector("digits", xtr, ytr, xva, yva, 10,
                   f"scikit-learn digits: {len(ytr)} train / {len(yva)} val, 8x8 images (64 features), 10 classes",
                   {"seed": seed, "val_fraction": val_fraction})


def _mnist1d(seed: int, num_samples: int) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; give it back
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    xtr, xva = _standardise(d["x"].astype(np.float64), d["x_test"].astype(np.float64))
    return _vector("mnist1d", xtr, d["y"], xva, d["y_test"], 10,
                   f"MNIST-1D (Greydanus 2020): {len(d['y'])} train / {len(d['y_test'])} val, 40 features, 10 classes",
                   {"seed": seed, "num_samples": num_samples})


# ----------------------------------------------------------------------------- sequence data

_NODE_SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


KHOP_LAYOUTS = ("edges", "table")


def _khop(hops: int, nodes: int, length: int, queries: int, layout: str, n_train: int, n_val: int,
          seed: int) -> Dataset:
    """k-hop pointer chasing: the answer needs ``hops`` sequential look-ups.

    ``layout="edges"``: each sequence lists ``length`` edges ``a -> f(a)`` (shuffled), then
    ``|`` and ``queries`` pairs ``q ?``; the target at each ``?`` is ``f^hops(q)``. The sources
    are ``length`` distinct nodes and every target is one of them, so chains never leave the
    listed edges (``length = 0`` means ``length = nodes``). Length ``2 * length + 1 + 2 * queries``.
    A look-up here needs an induction-style circuit (find the edge whose source is q, read its
    target), which small models learn slowly.

    ``layout="table"``: position ``i`` holds ``f(i)`` for every node ``i``, then ``|`` and
    ``queries`` query nodes; the target at each query token is ``f^hops(q)``. One look-up is
    one attention step (from a node's embedding to its position), so ``hops`` look-ups need
    about ``hops`` layers: the layout in which depth shows quickly. Length ``nodes + 1 + queries``.

    Tokens: node symbols, ``|``, ``?``. ``f`` is a uniformly random function, new per sequence.
    """
    if layout not in KHOP_LAYOUTS:
        raise ValueError(f"khop.layout must be one of {list(KHOP_LAYOUTS)}, got {layout!r}")
    if layout == "table" and length not in (0, nodes):
        raise ValueError(f"khop.length must be 0 or nodes={nodes} with layout='table', got {length}")
    length = length or nodes
    if length > nodes:
        raise ValueError(f"khop.length must be in [1, nodes={nodes}], got {length}")
    vocab = list(_NODE_SYMBOLS[:nodes]) + ["|", "?"]
    sep, qm = nodes, nodes + 1
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    src = torch.argsort(torch.rand(n, nodes, generator=g), dim=1)[:, :length]           # (n, L) distinct sources
    if layout == "table":  # node i at position i; the draw above still happens, so both layouts share
        src = torch.arange(nodes).expand(n, nodes)  # one random stream (same pointer structure per seed)
    tgt_idx = torch.randint(0, length, (n, length), generator=g)                          # f(src[i]) = src[tgt_idx[i]]
    tgt = torch.gather(src, 1, tgt_idx)
    q_idx = torch.randint(0, length, (n, queries), generator=g)
    cur = q_idx.clone()
    for _ in range(hops):
        cur = torch.gather(tgt_idx, 1, cur)
    answer = torch.gather(src, 1, cur)                                                    # (n, queries)
    query = torch.gather(src, 1, q_idx)
    if layout == "table":
        x = torch.cat([tgt, torch.full((n, 1), sep), query], dim=1)
        y = torch.full_like(x, IGNORE)
        y[:, nodes + 1:] = answer
        shape = f"a table of f over {nodes} nodes"
    else:
        order = torch.argsort(torch.rand(n, length, generator=g), dim=1)                  # shuffle edge order
        edges = torch.stack([torch.gather(src, 1, order), torch.gather(tgt, 1, order)], dim=2).reshape(n, 2 * length)
        asks = torch.stack([query, torch.full_like(query, qm)], dim=2).reshape(n, 2 * queries)
        x = torch.cat([edges, torch.full((n, 1), sep), asks], dim=1)
        y = torch.full_like(x, IGNORE)
        y[:, 2 * length + 2::2] = answer
        shape = f"{length} edges of {nodes} nodes"
    return Dataset("khop", "sequence", x[:n_train], y[:n_train], x[n_train:], y[n_train:], len(vocab),
                   f"{hops}-hop pointer chasing over {shape}, {queries} quer{'ies' if queries > 1 else 'y'} "
                   f"per sequence: {n_train} train / {n_val} val sequences of length {x.shape[1]}",
                   vocab, {"hops": hops, "nodes": nodes, "length": length, "queries": queries, "layout": layout,
                           "n_train": n_train, "n_val": n_val, "seed": seed})


def _modadd(p: int, train_fraction: float, seed: int) -> Dataset:
    """All ``p*p`` sequences ``a + b =`` with target ``(a + b) mod p`` at the last position."""
    vocab = [str(i) for i in range(p)] + ["+", "="]
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    y = torch.full_like(x, IGNORE)
    y[:, -1] = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = max(1, min(p * p - 1, round(train_fraction * p * p)))
    tr, va = perm[:n_train], perm[n_train:]
    return Dataset("modadd", "sequence", x[tr], y[tr], x[va], y[va], len(vocab),
                   f"a + b mod {p}: {len(tr)} train / {len(va)} val equations ({train_fraction:.0%} train)",
                   vocab, {"p": p, "train_fraction": train_fraction, "seed": seed})


_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the small bird", "a tired farmer", "the teacher",
             "our neighbour", "the red fox", "a young girl", "the baker", "the captain"]
_VERBS = ["sees", "finds", "likes", "follows", "helps", "watches", "paints", "remembers", "calls", "greets"]
_OBJECTS = ["the river", "a green apple", "the quiet house", "the moon", "a broken chair", "the market",
            "an open window", "the long road", "a warm loaf", "the garden", "a paper boat", "the hill"]
_ADVERBS = ["slowly", "today", "again", "at noon", "in the rain", "every morning", "without a word", "at last"]
_JOINS = [", and then", ", but", " because", " while", ", so"]


def _take(pieces, n_chars: int) -> str:
    """The first ``n_chars`` characters of the concatenated ``pieces``."""
    parts, size = [], 0
    for piece in pieces:
        if size >= n_chars:
            break
        parts.append(piece)
        size += len(piece)
    return "".join(parts)[:n_chars]


def _grammar_pieces(seed: int):
    rng = random.Random(seed)
    while True:
        clause = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.5:
            clause += " " + rng.choice(_ADVERBS)
        if rng.random() < 0.3:
            clause += f"{rng.choice(_JOINS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        sentence = clause[0].upper() + clause[1:] + rng.choice([".", ".", ".", "!", "?"])
        sentence += "\n" if rng.random() < 0.2 else " "
        yield sentence


def grammar_corpus(n_chars: int = 200_000, seed: int = 0) -> str:
    """A deterministic English-like corpus from a small grammar (Python's ``random.Random``).

    Offline default for the ``text`` dataset: the same on every machine for a given seed.
    """
    return _take(_grammar_pieces(seed), n_chars)


def _arithmetic_pieces(seed: int):
    rng = random.Random(seed)
    while True:
        op = rng.choice("++-*")
        if op == "*":
            a, b = rng.randrange(13), rng.randrange(13)
            yield f"{a}*{b}={a * b}\n"
        else:
            a, b = rng.randrange(100), rng.randrange(100)
            if op == "-" and b > a:
                a, b = b, a
            yield f"{a}{op}{b}={a + b if op == '+' else a - b}\n"


def arithmetic_corpus(n_chars: int = 200_000, seed: int = 0) -> str:
    """Deterministic lines of integer arithmetic such as ``37+45=82``, ``61-8=53``, ``7*9=63``.

    Operands below 100 for ``+``/``-`` (results never negative), below 13 for ``*``.
    """
    return _take(_arithmetic_pieces(seed), n_chars)


_FUNCS = ["add", "scale", "mix", "clip", "step", "shift", "count", "blend"]
_VARS = ["x", "y", "n", "k", "total", "value", "item", "size"]


def _code_pieces(seed: int):
    rng = random.Random(seed)
    while True:
        a, b, c = rng.sample(_VARS, 3)
        lines = [f"def {rng.choice(_FUNCS)}({a}, {b}):", f"    {c} = {a} {rng.choice('+-*')} {b}"]
        if rng.random() < 0.5:
            lines += [f"    if {c} > {rng.randrange(2, 20)}:", f"        {c} = {c} - {rng.randrange(1, 10)}"]
        if rng.random() < 0.5:
            lines += [f"    for i in range({rng.randrange(2, 10)}):", f"        {c} = {c} + i"]
        lines += [f"    return {c}", "", ""]
        yield "\n".join(lines)


def code_corpus(n_chars: int = 200_000, seed: int = 0) -> str:
    """Deterministic Python-like functions (assignments, ``if``, ``for`` loops, ``return``)."""
    return _take(_code_pieces(seed), n_chars)


CORPORA = {"grammar": grammar_corpus, "arithmetic": arithmetic_corpus, "code": code_corpus}
_PIECES = {"grammar": _grammar_pieces, "arithmetic": _arithmetic_pieces, "code": _code_pieces}
# every character each built-in corpus can write (a superset is safe: the alphabet search then reads on)
_DIGITS = "0123456789"
_CAN_WRITE = {
    "grammar": frozenset("".join(_SUBJECTS + _VERBS + _OBJECTS + _ADVERBS + _JOINS) + " .!?\n"
                         + "".join(s[0].upper() for s in _SUBJECTS)),
    "arithmetic": frozenset(_DIGITS + "+-*=\n"),
    "code": frozenset("".join(_FUNCS + _VARS) + _DIGITS + "def(, ):=+-*if>forinrange()return \n"),
}


def _corpus_alphabet(corpus: str, n_chars: int, seed: int) -> list[str]:
    """``sorted(set(CORPORA[corpus](n_chars, seed)))`` without generating all of it: the corpus is read piece
    by piece until ``n_chars`` characters or until every character it can write has appeared (a few
    thousand characters), so a 10-million-character corpus costs as little as a short one."""
    seen, size, every = set(), 0, _CAN_WRITE[corpus]
    for piece in _PIECES[corpus](seed):
        if size >= n_chars or seen >= every:
            break
        seen.update(piece[: n_chars - size])
        size += len(piece)
    return sorted(seen)


def _read_text_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text.path: no such file {str(p)!r}")
    size = p.stat().st_size
    if size > max_text_bytes():
        raise _too_big(f"text.path: {str(p)!r}", size)
    raw = p.read_bytes()[: max_text_bytes() + 1]  # the file may have grown since stat
    if len(raw) > max_text_bytes():
        raise _too_big(f"text.path: {str(p)!r}", len(raw))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text.path: {str(p)!r} is not UTF-8 text ({e.reason})") from None


def _check_text_length(n_chars: int, n_val_chars: int, context: int, val_fraction: float) -> None:
    if n_chars - n_val_chars < context + 1 or n_val_chars < context + 1:
        raise ValueError(f"text: {n_chars} characters is too short for context {context} "
                         f"(need at least {math.ceil((context + 1) / val_fraction)} with val_fraction "
                         f"{val_fraction})")


def _text(path, text, context: int, val_fraction: float, vocab, corpus_chars: int, seed: int,
          corpus: str | None = "grammar") -> Dataset:
    """Character-level next-token prediction; windows of ``context + 1`` characters, stride ``context``.

    The source is exactly one of ``text`` (the content itself, e.g. an upload), ``path`` (a
    UTF-8 file, read once: the dataset keeps and stores its content, never the path) and
    ``corpus`` (the built-in text, :data:`CORPORA`: ``"grammar"``, ``"arithmetic"``, ``"code"``,
    ``corpus_chars`` long from ``seed``). Text is at most ``WORKBENCH_MAX_UPLOAD_MB`` MB.
    The first ``1 - val_fraction`` of the text trains, the rest validates. ``vocab`` fixes
    the alphabet (e.g. to share one substrate between specialists); by default it is the
    sorted set of the text's characters.
    """
    if path is not None:
        text = _read_text_file(path)
    if text is not None:
        source, opts = "the supplied text", {"text": text}
    else:
        text, source, opts = CORPORA[corpus](corpus_chars, seed), f"built-in {corpus} corpus", {"corpus": corpus}
    chars = sorted(set(text)) if vocab is None else list(dict.fromkeys(vocab))
    index = {c: i for i, c in enumerate(chars)}
    unknown = sorted(set(text) - set(index))
    if unknown:
        raise ValueError(f"text.vocab: {len(unknown)} characters of the text are missing from it, e.g. {unknown[:5]}")
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n_val_chars = int(len(ids) * val_fraction)
    _check_text_length(len(ids), n_val_chars, context, val_fraction)

    def windows(t: torch.Tensor):
        w = t.unfold(0, context + 1, context)  # (N, context + 1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    xtr, ytr = windows(ids[: len(ids) - n_val_chars])
    xva, yva = windows(ids[len(ids) - n_val_chars:])
    return Dataset("text", "sequence", xtr, ytr, xva, yva, len(chars),
                   f"characters of {source}: {len(ids):,} chars, vocabulary {len(chars)}, context {context}",
                   chars, {**opts, "context": context, "val_fraction": val_fraction, "vocab": vocab,
                           "corpus_chars": corpus_chars, "seed": seed})


_LOADERS = {"digits": _digits, "mnist1d": _mnist1d, "khop": _khop, "modadd": _modadd, "text": _text}
