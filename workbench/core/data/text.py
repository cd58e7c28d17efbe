"""Character-level text: the ``text`` dataset (an upload, a file or a built-in corpus, at most
``WORKBENCH_MAX_UPLOAD_MB``) and the three deterministic built-in corpora (grammar, arithmetic, code).

Definitions: ``docs/definitions.md#datasets``.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from ..checks import env_limit
from .dataset import Dataset, Shape


# ----------------------------------------------------------------------------- text data


def max_text_bytes() -> int:
    """Largest text the ``text`` dataset takes, in bytes of UTF-8 (``WORKBENCH_MAX_UPLOAD_MB``, default 2)."""
    return int(env_limit("WORKBENCH_MAX_UPLOAD_MB", 2) * 2**20)


def _too_big(what: str, n_bytes: int) -> ValueError:
    limit = max_text_bytes()
    return ValueError(f"{what} is {n_bytes / 2**20:.2f} MB, more than the limit of {limit / 2**20:g} MB "
                      f"(WORKBENCH_MAX_UPLOAD_MB)")


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
