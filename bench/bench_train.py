"""Training throughput of our Transformer against torch.nn.TransformerEncoderLayer, and its MFU.

Both models have the same shape (d_model 256, 4 layers, 4 heads, MLP 1024, context 128,
batch 16, vocabulary 256, pre-LN, GELU, causal) and train with AdamW for the same number of
steps in this process. Model FLOPs per token follow Kaplan/PaLM: ``6 N + 12 L T d`` (N =
non-embedding parameters plus the readout, L layers, T context, d width; the second term is
attention scores and values, forward + backward). Utilisation = achieved model FLOP/s over the
float32 matmul throughput measured here on (2048 x 2048) @ (2048 x 2048).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

import workbench as wb

D, L, H, T, B, V, D_MLP = 256, 4, 4, 128, 16, 256, 1024


class ReferenceLM(nn.Module):
    """Same shape built from torch's own layers."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        layer = nn.TransformerEncoderLayer(D, H, D_MLP, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.stack = nn.TransformerEncoder(layer, L, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(self.norm(self.stack(h, mask=self.mask, is_causal=True)))


def _tokens_per_second(model: nn.Module, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)

    def step():
        loss = nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * B * T / (time.perf_counter() - t0)


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def run(quick: bool = False) -> list[dict]:
    steps = 3 if quick else 12
    cfg = wb.models.TransformerConfig(vocab_size=V, context=T, d_model=D, n_layers=L, n_heads=H, d_mlp=D_MLP)
    ours_model = wb.models.build(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref_model = ReferenceLM()
    # interleave to share the machine's state fairly; best of two
    ours = max(_tokens_per_second(ours_model, steps), _tokens_per_second(ours_model, steps))
    ref = max(_tokens_per_second(ref_model, steps), _tokens_per_second(ref_model, steps))
    n_params = sum(p.numel() for n, p in ours_model.named_parameters() if not n.startswith(("tok_embed", "pos_embed")))
    flops_per_token = 6 * n_params + 12 * L * T * D
    peak = matmul_flops(1024 if quick else 2048)
    mfu = ours * flops_per_token / peak
    return [
        {"entry": "train tokens/s: Transformer vs nn.TransformerEncoderLayer stack", "ours": ours, "reference": ref,
         "unit": "tokens/s", "ratio": ours / ref, "target": ">= 1.0", "ok": ours / ref >= 1.0,
         "note": f"d{D} L{L} H{H} T{T} B{B}, AdamW, {steps} steps"},
        {"entry": "model FLOP utilisation (6N + 12LTd) vs measured fp32 matmul", "ours": ours * flops_per_token,
         "reference": peak, "unit": "FLOP/s", "ratio": mfu, "target": ">= 0.45", "ok": mfu >= 0.45,
         "note": f"{flops_per_token / 1e6:.1f} MFLOP/token"},
    ]
