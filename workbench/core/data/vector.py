"""Vector datasets (features and one label per example): scikit-learn's 8x8 digits and MNIST-1D
(Greydanus 2020), standardised with train statistics.

Definitions: ``docs/definitions.md#mnist1d``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .dataset import Dataset, Shape


# ----------------------------------------------------------------------------- vector data


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
