"""The predecessor's per-position embedding (token + fixed sinusoidal position + learned Fourier-feature
AF term, then LayerNorm): part of the L×D yardstick (``bench.yardstick.lxd``) that the compact retrievers
are measured against; no model of rag_hpc uses it.

Strictly per position (no mixing across sites): the equivalence relies on it. For such an embedding the
squared L2 distance between two flattened, equally masked sequences is a weighted Hamming distance,
sum_i [q_i != r_i] * w_i with w_i = ||e(ALT, i) - e(REF, i)||^2 (DESIGN.md §2), which is what
``rag_hpc.index.retrieval.masked_topk`` ranks by with the weights ``lxd.site_weights`` derives from
``allele_embeddings``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PAD, UNK, SOS, EOS, MASK, REF, ALT = range(7)
VOCAB_SIZE = 7


def sinusoidal_positions(length: int, dims: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dims, 2, dtype=torch.float32) * (-math.log(10000.0) / dims))
    table = torch.zeros(length, dims)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dims // 2])
    return table


class SiteEmbedding(nn.Module):
    """e(token, position, AF) for sequences laid out as [SOS, a_1 .. a_L, PAD ...]."""

    def __init__(self, dims: int, max_seq_len: int, n_fourier: int = 16):
        super().__init__()
        self.token = nn.Embedding(VOCAB_SIZE, dims, padding_idx=PAD)
        self.register_buffer("position", sinusoidal_positions(max_seq_len, dims), persistent=False)
        self.af_freq = nn.Parameter(torch.randn(n_fourier))
        self.af_proj = nn.Linear(2 * n_fourier, dims)
        self.norm = nn.LayerNorm(dims)

    def forward(self, tokens: torch.Tensor, af: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (long), af [B, T] or [T] (float, 0 at SOS/PAD) -> [B, T, D]."""
        phase = 2 * math.pi * af[..., None] * self.af_freq
        af_term = self.af_proj(torch.cat([phase.sin(), phase.cos()], dim=-1))
        x = self.token(tokens) + self.position[: tokens.shape[-1]] + af_term
        return self.norm(x)

    def allele_embeddings(self, af: torch.Tensor) -> torch.Tensor:
        """Embeddings of REF and ALT at each window site: af [L] -> [2, L, D] (sites sit at positions 1..L)."""
        length = af.shape[0]
        tokens = torch.tensor([REF, ALT], device=af.device)[:, None].expand(2, length + 1).clone()
        tokens[:, 0] = SOS
        af_full = torch.cat([af.new_zeros(1), af])
        return self.forward(tokens, af_full)[:, 1:]
