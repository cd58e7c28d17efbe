"""Glyph embeddings (Bochkov 2025): each token drawn as a bitmap, the bitmaps reduced by PCA over the
vocabulary to a frozen embedding table.

Definitions: ``docs/definitions.md#glyph-embedding``.
"""
from __future__ import annotations

import torch

# ----------------------------------------------------------------------------- glyphs

_UNIFONT_PATHS = (
    "/usr/share/fonts/opentype/unifont/unifont.otf",
    "/usr/share/fonts/truetype/unifont/unifont.ttf",
    "/usr/share/fonts/unifont/unifont.otf",
)


def _load_font(font: str | None, size: int = 32):
    import os

    from PIL import ImageFont

    if font is None:
        for path in _UNIFONT_PATHS:
            if os.path.exists(path):
                return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC), path
        return ImageFont.load_default(size=size), "pillow-default"
    if not os.path.exists(font):
        raise ValueError(f"glyph_font: font file {font!r} does not exist")
    return ImageFont.truetype(font, size, layout_engine=ImageFont.Layout.BASIC), font


def _render(text: str, font, size: int = 32):
    import numpy as np
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    w, h = max(right - left, 1), max(bottom - top, 1)
    img = Image.new("L", (max(w, size), max(h, size)), 0)
    ImageDraw.Draw(img).text((-left, -top), text, font=font, fill=255)
    if img.size != (size, size):  # multi-character tokens: drawn side by side, then resized
        img = img.resize((size, size), Image.BILINEAR)
    return (np.asarray(img) > 127).astype(np.float32)  # (size, size) binary


def glyph_images(vocab: list[str], font: str | None = None, size: int = 32):
    """Render each token as a ``size x size`` binary bitmap (Bochkov 2025 recipe).

    Returns ``(images (V, size, size) float32 array, report)`` where ``report`` is a dict with
    the font used and ``fallback``: the tokens the font cannot draw (blank or the font's
    missing-glyph box). Those are drawn as their code points (``U+000A``) instead, so no two
    tokens silently share a bitmap.
    """
    import unicodedata

    import numpy as np

    pil_font, used = _load_font(font, size)
    missing_box = _render("\U0010fffd", pil_font, size)  # a code point no font draws
    images, fallback = [], []
    for tok in vocab:
        drawable = all(unicodedata.category(c)[0] not in "CZ" or c == " " for c in tok)
        img = _render(tok, pil_font, size) if drawable else np.zeros((size, size), np.float32)
        if img.sum() == 0 or np.array_equal(img, missing_box):
            fallback.append(tok)
            img = _render(" ".join(f"U+{ord(c):04X}" for c in tok), pil_font, size)
        images.append(img)
    return np.stack(images), {"font": used, "fallback": fallback, "coverage": 1 - len(fallback) / max(len(vocab), 1)}


def glyph_embedding(vocab: list[str], d_model: int, font: str | None = None):
    """Frozen glyph embedding table ``(V, d_model)``: bitmaps -> PCA over the vocabulary -> L2-normalised rows.

    PCA yields at most ``min(V, 1024)`` components; when ``d_model`` exceeds that, the
    remaining columns are zero (the rows still differ). Returns ``(table, report)``.
    """
    import numpy as np

    images, report = glyph_images(vocab, font)
    X = images.reshape(len(vocab), -1).astype(np.float64)
    X = X - X.mean(axis=0, keepdims=True)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    k = min(d_model, U.shape[1])
    table = np.zeros((len(vocab), d_model))
    table[:, :k] = U[:, :k] * S[:k]
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    table = table / np.maximum(norms, 1e-12)
    return torch.tensor(table, dtype=torch.float32), report
