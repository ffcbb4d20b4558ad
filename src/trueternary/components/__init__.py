"""MORPH's components: each a module over ternary state with a plain-PyTorch reference.

| component | file | ternary / integer state |
| --- | --- | --- |
| ``TernaryEmbeddingTable`` | ``layers.TernaryEmbedding`` | packed trits, int8 E / E_accum / T_accum, sparse row votes |
| ``TernaryLSTMCell`` | ``lstm.py`` | one ternary projection over ``[x, h]`` |
| ``TernaryVQCodebook`` | ``vq.py`` | ternary codebook, int32 usage / idle counters |
| ``CausalGraphAggregation`` | ``graph.py`` | ternary message / output projections, ternary edge attributes |
| ``TernaryMoE`` | ``moe.py`` | ternary router and experts, int32 balance bias |
| ``FrozenEncoder`` | ``encoders.py`` | ternary projection; the user's frozen encoder (float, not trained) |
| ``ViTImageEncoder``, ``WhisperAudioEncoder`` | ``hf_encoders.py`` | none: frozen ``transformers`` encoders to attach |

Every module takes ``ternary=False`` to build its float twin from ``nn.Linear`` / ``nn.Embedding``,
which ``trueternary.ternarize`` converts (and ``fake_ternarize`` wraps), so one definition serves all
benchmark configurations.
"""

from ..layers import TernaryEmbedding
from .encoders import FrozenEncoder, bracket_modality
from .graph import CausalGraphAggregation, causal_graph, previous_same_code
from .hf_encoders import ViTImageEncoder, WhisperAudioEncoder
from .lstm import TernaryLSTMCell, TernaryLSTMFunction, lstm_sequence_reference, lstm_step
from .moe import AuxLossScaler, Expert, TernaryMoE, switch_aux_loss
from .vq import TernaryVQCodebook, VQOutput, nearest_code

# The packed ternary lookup table with sparse row updates already exists: TernaryEmbedding (layers.py)
# keeps T_packed / E / E_accum / T_accum and its backward votes only on the rows a batch touched.
TernaryEmbeddingTable = TernaryEmbedding

__all__ = [
    "AuxLossScaler",
    "CausalGraphAggregation",
    "Expert",
    "FrozenEncoder",
    "TernaryEmbeddingTable",
    "TernaryLSTMCell",
    "TernaryLSTMFunction",
    "TernaryMoE",
    "TernaryVQCodebook",
    "VQOutput",
    "ViTImageEncoder",
    "WhisperAudioEncoder",
    "bracket_modality",
    "causal_graph",
    "lstm_sequence_reference",
    "lstm_step",
    "nearest_code",
    "previous_same_code",
    "switch_aux_loss",
]
