"""Latent-weight baselines: fake-quantised ternary layers over float weights (BitNet-style QAT).

``QATLinear`` / ``QATEmbedding`` keep an fp32 latent weight and use ``absmean_ternary_ste`` in the
forward (per-tensor absmean scale, round-and-clip to {-1, 0, 1}, straight-through gradient), as in
BitNet b1.58. Trained with AdamW this is the ``BitNet_QAT`` benchmark config; trained with SignGSD
it is ``SignSGD_Old``. Activations stay in full precision in both, as in TrueTernary, so the
comparison isolates the weight representation and its update rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import absmean_ternary_ste, group_absmean_log2, group_pow2_ternary_ste

QUANTIZERS = ("absmean", "group_pow2")


def fake_quant(w, quantizer: str, group_size: int):
    """The ternary forward weight of a latent ``w``: BitNet's per-tensor absmean (``absmean``), or
    TrueTernary's weight format, per-group absmean trits times a power-of-two scale (``group_pow2``)."""
    if quantizer == "group_pow2":
        return group_pow2_ternary_ste(w, group_size)
    return absmean_ternary_ste(w)


class QATLinear(nn.Linear):
    quantizer, group_size = "absmean", 64

    def forward(self, x):
        return F.linear(x, fake_quant(self.weight, self.quantizer, self.group_size), self.bias)


class QATEmbedding(nn.Embedding):
    quantizer, group_size = "absmean", 64

    def forward(self, idx):
        return F.embedding(idx, fake_quant(self.weight, self.quantizer, self.group_size), self.padding_idx)


def fake_ternarize(module: nn.Module, quantizer: str = "absmean", group_size: int = 64) -> nn.Module:
    """Swap every nn.Linear / nn.Embedding for its QAT twin in place, keeping the float weights."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, QATLinear):
            q = QATLinear(child.in_features, child.out_features, bias=child.bias is not None,
                          device=child.weight.device)
            q.load_state_dict(child.state_dict())
        elif isinstance(child, nn.Embedding) and not isinstance(child, QATEmbedding):
            q = QATEmbedding(child.num_embeddings, child.embedding_dim, child.padding_idx,
                             device=child.weight.device)
            q.load_state_dict(child.state_dict())
        else:
            fake_ternarize(child, quantizer, group_size)
            continue
        q.quantizer, q.group_size = quantizer, group_size
        setattr(module, name, q)
    return module


@torch.no_grad()
def forward_trits(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trits each QAT layer's forward uses now (int8, per layer): what ``absmean_ternary_ste`` rounds to.

    Comparing two snapshots counts the latent configs' trit changes per step, the number TrueTernary reports
    as flips (a diagnostic of the benchmark; it is not training state)."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (QATLinear, QATEmbedding)):
            w = m.weight.detach()
            if m.quantizer == "group_pow2":
                T = group_absmean_log2(w, m.group_size)[0]
            else:
                s = w.abs().mean().clamp_min(1e-5)  # the same scale as absmean_ternary_ste
                T = torch.clamp(torch.round(w / s), -1, 1).to(torch.int8)
            out[name] = T.cpu()  # kept on the host, so the count adds nothing to the device's peak memory
    return out
