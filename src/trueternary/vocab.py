"""The byte-level vocabulary: 256 byte values followed by 32 special tokens (288 in all).

    0..255    the raw byte values
    256       BOS   beginning of a document
    257       EOS   end of a document
    258       PAD   padding (never a training target)
    259       SEP   separator between segments
    260       MOD   start of a modality (e.g. an encoder's embeddings fed as tokens)
    261       MOD_END
    262..287  reserved (RESERVED_0 .. RESERVED_25)

Text is encoded as its UTF-8 bytes, so any text and any binary data is representable with no
tokenizer to train or ship.
"""

from __future__ import annotations

import torch

N_BYTES = 256
N_SPECIAL = 32
VOCAB_SIZE = N_BYTES + N_SPECIAL

SPECIAL_NAMES = ["BOS", "EOS", "PAD", "SEP", "MOD", "MOD_END"] + [f"RESERVED_{i}" for i in range(26)]
SPECIAL = {name: N_BYTES + i for i, name in enumerate(SPECIAL_NAMES)}
BOS, EOS, PAD, SEP, MOD, MOD_END = (SPECIAL[n] for n in SPECIAL_NAMES[:6])
assert len(SPECIAL_NAMES) == N_SPECIAL


def encode(text: str | bytes) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids (0..255)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def decode(ids) -> str:
    """Token ids back to text: bytes are decoded as UTF-8 (invalid sequences replaced), specials dropped."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(i for i in ids if 0 <= i < N_BYTES).decode("utf-8", errors="replace")
