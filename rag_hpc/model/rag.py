"""Retrieval-augmented imputer: per-site attention over Li–Stephens donors, then a residual network.

Per batch (query haplotypes of one window, typed at one array's sites):

1. retrieval (``rag_hpc.index.donors``, outside the model): for every gap between typed sites, each
   query's k donors — the reference haplotypes the Li–Stephens HMM over *all* the chromosome's typed sites
   says it copies from there — with their posterior weights w;
2. per site, attention over the gap's donors: score = log w + a learned correction from the weight and
   the donor's rank (per gap) and from the donor's allele and the site's MAF (per site); P_copy = Σ α ·
   donor allele — the copy Li–Stephens does, re-weighted where training shows it over- or under-trusts;
3. a residual network over the sites of the window (per-site features, then 1-D convolutions over
   neighbouring sites) adds a logit correction for what the donors miss (calibration by frequency,
   disagreement among donors, the typed neighbours);
4. loss: binary cross-entropy on the untyped sites, on logits.

Both learned corrections start at exactly zero, so an untrained model *is* the copy predictor with k
donors: training starts from Li–Stephens and can only be kept if it validates better. Every cost is
O(B·L·k) for the attention and O(B·L·D²) for the residual network, small next to the HMM that finds
the donors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rag_hpc.config import ModelConfig

# Probabilities are kept inside [EPS, 1 - EPS] before the logit: a copy that every donor agrees on
# would otherwise be an infinite logit.
EPS = 1e-4
SITE_FEATURES = 8


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class DonorImputer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # No bias on the score: a shift common to all donors cancels in the softmax, so its gradient is
        # rounding noise, which AdamW would turn into steps.
        self.gap_score = nn.Sequential(nn.Linear(2, 16), nn.GELU(), _zero(nn.Linear(16, 1, bias=False)))
        self.allele_score = _zero(nn.Linear(2, 1))
        self.inp = nn.Linear(SITE_FEATURES, cfg.dims)
        self.mix = nn.ModuleList(nn.Conv1d(cfg.dims, cfg.dims, cfg.kernel, padding=cfg.kernel // 2) for _ in range(cfg.layers))
        self.head = nn.Sequential(nn.GELU(), nn.Linear(cfg.dims, cfg.dims), nn.GELU(), _zero(nn.Linear(cfg.dims, 1)))

    def forward(self, alleles: Tensor, weights: Tensor, gaps: Tensor, query: Tensor, observed: Tensor, maf: Tensor) -> Tensor:
        """alleles [B, L, k] donor alleles (0/1) at each site; weights [B, G, k] donor weights per gap;
        gaps [L] long: each site's gap (row of ``weights``), i.e. donors and weights of site l are those
        of gap gaps[l]; query [B, L] the query's alleles (read at typed sites only); observed [L] bool:
        typed sites; maf [L] -> ALT logits [B, L]."""
        b, length, k = alleles.shape
        log_w = torch.log(weights.float().clamp(min=1e-6))
        rank = (torch.arange(k, device=alleles.device, dtype=torch.float32) / k).expand_as(log_w)
        score = log_w + self.gap_score(torch.stack([log_w / 10, rank], dim=-1)).squeeze(-1)  # [B, G, k]
        log_maf = torch.log10(maf.float().clamp(min=EPS)) / 4  # [L], in about [-1, 0]
        allele_bias = self.allele_score(torch.stack([log_maf, log_maf * log_maf], dim=-1))  # [L, 1]
        alleles = alleles.float()
        site_score = score[:, gaps] + alleles * allele_bias  # [B, L, k]
        alpha = site_score.softmax(dim=-1)
        p = (alpha * alleles).sum(-1).clamp(EPS, 1 - EPS)
        logit = torch.logit(p)
        entropy = -(alpha * torch.log(alpha.clamp(min=1e-9))).sum(-1) / math.log(k)
        typed = observed.float().expand(b, length)
        known = torch.where(observed, 2 * query.float() - 1, torch.zeros_like(p))  # ±1 at typed sites
        features = torch.stack(
            [logit / 5, p, entropy, alpha.max(-1).values, log_maf.expand(b, length), typed, known, (2 * p - 1) * known],
            dim=-1,
        )
        x = self.inp(features)  # [B, L, D]
        drop = self.cfg.dropout if self.training else 0.0
        for conv in self.mix:
            x = x + F.dropout(F.gelu(conv(x.transpose(1, 2))).transpose(1, 2), drop, self.training)
        return logit + self.head(x).squeeze(-1)


def imputation_loss(logits: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Mean binary cross-entropy over masked (untyped) sites (0 when nothing is masked)."""
    if not bool(masked.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[masked].float(), target[masked].float())
