"""Embedding-RAG imputer: one file, nanoGPT-style.

Per batch (all queries from one window, so one length L):

1. each query haplotype retrieves its k nearest reference haplotypes of the window by the exact
   masked distance (``retrieve``; site weights read from the current embedding, own sample excluded);
2. the query (masked sites = MASK) and the retrieved *complete* haplotypes go through the same
   per-position embedding, with gradient; retrieved haplotypes never run through the encoder, so
   fusion costs O(B·L·(k+1)·D) memory;
3. per site, attention over the k retrieved embeddings, scored by the query·key product plus how
   well each retrieved haplotype agrees with the query on the observed sites around that site at
   several scales (a learned, local version of "copy from the haplotype that matches here");
4. the fused query runs through a pre-LN transformer encoder (scaled_dot_product_attention);
5. a head gives one logit per site: P(ALT). Loss: binary cross-entropy on masked sites, on logits
   (one sigmoid, applied once — the predecessor's double softmax squashed probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rag_hpc.config import ModelConfig
from rag_hpc.index.retrieval import masked_topk, site_weights
from rag_hpc.model.embedding import ALT, MASK, REF, SOS, SiteEmbedding


def allele_tokens(alleles: Tensor, masked: Tensor | None = None) -> Tensor:
    """[..., L] alleles (0/1) -> [..., L + 1] tokens with SOS first and MASK where masked."""
    tokens = torch.where(alleles.bool(), ALT, REF).long()
    if masked is not None:
        tokens = tokens.masked_fill(masked, MASK)
    sos = torch.full((*tokens.shape[:-1], 1), SOS, dtype=torch.long, device=tokens.device)
    return torch.cat([sos, tokens], dim=-1)


def _window_sums(x: Tensor, half: int) -> Tensor:
    """Sum of x over sites [i - half, i + half] along the last axis (clipped at the edges)."""
    c = F.pad(x.cumsum(-1), (1, 0))
    length = x.shape[-1]
    idx = torch.arange(length, device=x.device)
    hi = (idx + half + 1).clamp(max=length)
    lo = (idx - half).clamp(min=0)
    return c[..., hi] - c[..., lo]


class Block(nn.Module):
    def __init__(self, dims: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dims)
        self.qkv = nn.Linear(dims, 3 * dims)
        self.proj = nn.Linear(dims, dims)
        self.ln2 = nn.LayerNorm(dims)
        self.mlp = nn.Sequential(nn.Linear(dims, 4 * dims), nn.GELU(), nn.Linear(4 * dims, dims))
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop).transpose(1, 2).reshape(b, t, d)
        x = x + F.dropout(self.proj(y), drop, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), drop, self.training)


class RetrievalFusion(nn.Module):
    """Per-site attention of the query over its k retrieved haplotypes."""

    def __init__(self, dims: int, scales: list[int]):
        super().__init__()
        self.scales = list(scales)
        n_feat = 2 * len(self.scales) + 1
        self.match = nn.Sequential(nn.Linear(n_feat, 32), nn.GELU(), nn.Linear(32, 1))
        self.q = nn.Linear(dims, dims)
        self.k = nn.Linear(dims, dims)
        self.out = nn.Sequential(nn.Linear(2 * dims + 1, dims), nn.GELU(), nn.Linear(dims, dims))

    def match_features(self, query: Tensor, observed: Tensor, retrieved: Tensor) -> Tensor:
        """[B, k, L, F]: mismatch rate and observed density around each site, per scale, + rank."""
        obs = observed.float()[:, None, :]  # [B, 1, L]
        mism = (query[:, None, :] != retrieved).float() * obs  # [B, k, L]
        feats = []
        for half in self.scales:
            n_obs = _window_sums(obs, half)
            feats.append(_window_sums(mism, half) / n_obs.clamp(min=1.0))
            feats.append((n_obs / (2 * half + 1)).expand_as(mism))
        k = retrieved.shape[1]
        rank = torch.arange(k, device=query.device, dtype=torch.float32) / max(k - 1, 1)
        feats.append(rank[None, :, None].expand_as(mism))
        return torch.stack(feats, dim=-1)

    def forward(self, e_query: Tensor, e_ret: Tensor, query: Tensor, observed: Tensor, retrieved: Tensor) -> Tensor:
        """e_query [B, L, D], e_ret [B, k, L, D] -> fused [B, L, D]."""
        d = e_query.shape[-1]
        score = self.match(self.match_features(query, observed, retrieved)).squeeze(-1)  # [B, k, L]
        score = score + torch.einsum("bld,bkld->bkl", self.q(e_query), self.k(e_ret)) / d**0.5
        alpha = score.softmax(dim=1)
        fused = torch.einsum("bkl,bkld->bld", alpha, e_ret)
        p_copy = torch.einsum("bkl,bkl->bl", alpha, retrieved.float())[..., None]
        return e_query + self.out(torch.cat([e_query, fused, 2 * p_copy - 1], dim=-1))


class RagImputer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        self.embed = SiteEmbedding(cfg.dims, max_seq_len)
        self.fusion = RetrievalFusion(cfg.dims, cfg.match_scales)
        self.blocks = nn.ModuleList(Block(cfg.dims, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dims)
        self.head = nn.Linear(cfg.dims, 1)

    @torch.no_grad()
    def site_weights(self, af: Tensor) -> Tensor:
        """w_i = ||e(ALT, i) - e(REF, i)||^2 of the current embedding: what retrieval ranks by."""
        return site_weights(self.embed.allele_embeddings(af.float()))

    def forward(self, query: Tensor, masked: Tensor, af: Tensor, retrieved: Tensor) -> Tensor:
        """query [B, L] alleles (values at masked sites are ignored), masked [B, L] bool,
        af [L], retrieved [B, k, L] alleles of the retrieved references -> ALT logits [B, L]."""
        b, length = query.shape
        if length + 1 > self.max_seq_len:
            raise ValueError(f"window of {length} sites + SOS exceeds max_seq_len={self.max_seq_len}")
        k = retrieved.shape[1]
        af_seq = torch.cat([af.new_zeros(1), af]).float()
        query = torch.where(masked, torch.zeros_like(query), query)  # nothing leaks from hidden sites
        e_query = self.embed(allele_tokens(query, masked), af_seq)
        e_ret = self.embed(allele_tokens(retrieved.reshape(b * k, length)), af_seq).view(b, k, length + 1, -1)
        fused = self.fusion(e_query[:, 1:], e_ret[:, :, 1:], query, ~masked, retrieved)
        x = torch.cat([e_query[:, :1], fused], dim=1)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.cfg.activation_checkpointing and self.training else block(x)
        return self.head(self.ln_f(x[:, 1:])).squeeze(-1)


def imputation_loss(logits: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Mean binary cross-entropy over masked sites (0 when nothing is masked)."""
    if not bool(masked.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[masked].float(), target[masked].float())


@torch.no_grad()
def retrieve(
    model: RagImputer,
    query: Tensor,
    observed: Tensor,
    reference: Tensor,
    af: Tensor,
    k: int,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest references per query under each query's own mask, ranked by the current
    embedding's site weights. Returns (reference indices [B, k], their alleles [B, k, L])."""
    weights = model.site_weights(af)
    _, idx = masked_topk(query, observed, reference, weights, k, exclude)
    return idx, reference[idx]
