"""Latent-weight baselines: fake-quantised ternary layers over float weights (BitNet-style QAT).

``QATLinear`` / ``QATEmbedding`` keep an fp32 latent weight and use ``absmean_ternary_ste`` in the
forward (per-tensor absmean scale, round-and-clip to {-1, 0, 1}, straight-through gradient), as in
BitNet b1.58. Trained with AdamW this is the ``BitNet_QAT`` benchmark config; trained with SignGSD
it is ``SignSGD_Old``. Activations stay in full precision in both, as in TrueTernary, so the
comparison isolates the weight representation and its update rule.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .quant import absmean_ternary_ste


class QATLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, absmean_ternary_ste(self.weight), self.bias)


class QATEmbedding(nn.Embedding):
    def forward(self, idx):
        return F.embedding(idx, absmean_ternary_ste(self.weight), self.padding_idx)


def fake_ternarize(module: nn.Module) -> nn.Module:
    """Swap every nn.Linear / nn.Embedding for its QAT twin in place, keeping the float weights."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, QATLinear):
            q = QATLinear(child.in_features, child.out_features, bias=child.bias is not None,
                          device=child.weight.device)
            q.load_state_dict(child.state_dict())
            setattr(module, name, q)
        elif isinstance(child, nn.Embedding) and not isinstance(child, QATEmbedding):
            q = QATEmbedding(child.num_embeddings, child.embedding_dim, child.padding_idx,
                             device=child.weight.device)
            q.load_state_dict(child.state_dict())
            setattr(module, name, q)
        else:
            fake_ternarize(child)
    return module
