"""Seeded moves of a model's weights away from their init, shared by the tests of merging and growth.

A freshly built model has LayerNorm gains of 1 and biases of 0, where many identities hold trivially;
moving every tensor by seeded noise makes a preservation or merge test able to fail.
"""
import copy

import torch


def perturb_(model, seed: int = 1, scale: float = 0.3):
    """In place: every parameter moves by ``scale`` times its own std (1 for constant tensors) of noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 and p.std() > 0 else 1.0))
    return model


def perturbed(model, seed: int, scale: float = 0.05):
    """A copy of ``model`` (eval mode) whose trainable tensors moved by ``scale`` times seeded standard
    noise: a stand-in for fine-tuning from a shared base."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return out.eval()
