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

import itertools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rag_hpc.config import ModelConfig

# Probabilities are kept inside [EPS, 1 - EPS] before the logit: a copy that every donor agrees on
# would otherwise be an infinite logit.
EPS = 1e-4
SITE_FEATURES = 8

# donor_sums builds CSR matrices; torch warns once per process that its CSR support is 'beta'.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _zero(layer: nn.Module) -> nn.Module:
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
        self.gap_score = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), _zero(nn.Linear(8, 1, bias=False)))
        self.allele_score = _zero(nn.Linear(2, 1))
        # Sites along the last axis throughout ([B, D, L]), so every layer is a contiguous Conv1d.
        self.inp = nn.Conv1d(SITE_FEATURES, cfg.dims, 1)
        self.mix = nn.ModuleList(nn.Conv1d(cfg.dims, cfg.dims, cfg.kernel, padding=cfg.kernel // 2) for _ in range(cfg.layers))
        # ReLU, not GELU: on CPU the activations were a fifth of the imputation's model time.
        self.head = nn.Sequential(nn.ReLU(), _zero(nn.Conv1d(cfg.dims, 1, 1)))

    def forward(
        self, reference: Tensor, donors: Tensor, weights: Tensor, gaps: Tensor, query: Tensor, observed: Tensor, maf: Tensor
    ) -> Tensor:
        """reference float [N, L]: the window's reference alleles (0/1); donors long [B, G, k]: each query's
        donors (rows of ``reference``) per gap, heaviest first, and weights [B, G, k] their weights; gaps
        long [L], increasing: each site's gap (donors and weights of site l are those of gap gaps[l]); query
        [B, L] the query's alleles (read at typed sites only); observed [L] bool: typed sites; maf [L]
        -> ALT logits [B, L]."""
        b, length = query.shape
        k = donors.shape[-1]
        log_w = torch.log(weights.float().clamp(min=1e-6))
        rank = (torch.arange(k, device=log_w.device, dtype=torch.float32) / k).expand_as(log_w)  # donors come heaviest first
        score = log_w + self.gap_score(torch.stack([log_w / 10, rank], dim=-1)).squeeze(-1)  # [B, G, k]
        log_maf = torch.log10(maf.float().clamp(min=EPS)) / 4  # [L], in about [-1, 0]
        bias = self.allele_score(torch.stack([log_maf, log_maf * log_maf], dim=-1)).squeeze(-1)  # [L]
        # Per site, attention over the gap's donors with ALT donors' scores raised by bias[l]:
        # alpha_k = e_k exp(bias a_k) / Z, so P(ALT) = eb S1 / (S0 + eb S1), S1 = the sum of e over the ALT
        # donors. That sum is the only thing that varies by site: one sparse product (``donor_sums``), not
        # a softmax over k donors at every site. The features of how concentrated the donors are (entropy,
        # the heaviest's share) are the gap's.
        top = score.max(dim=-1, keepdim=True).values
        e = torch.exp(score - top)  # [B, G, k], max 1
        e_all = e.sum(-1)  # [B, G]
        entropy = (torch.log(e_all) + top.squeeze(-1) - (e * score).sum(-1) / e_all) / math.log(k)
        s1 = donor_sums(e, donors, reference, gaps)  # [B, L]
        e_site = e_all[:, gaps]
        eb = torch.exp(bias)
        p = (eb * s1 / ((e_site - s1).clamp(min=0.0) + eb * s1)).clamp(EPS, 1 - EPS)
        logit = torch.logit(p)
        typed = observed.float().expand(b, length)
        known = torch.where(observed, 2 * query.float() - 1, torch.zeros_like(p))  # ±1 at typed sites
        features = torch.stack(
            [logit / 5, p, entropy[:, gaps], 1.0 / e_site, log_maf.expand(b, length), typed, known, (2 * p - 1) * known],
            dim=1,
        )
        x = self.inp(features)  # [B, D, L]
        drop = self.cfg.dropout if self.training else 0.0
        for conv in self.mix:
            x = x + F.dropout(F.relu(conv(x)), drop, self.training)
        return logit + self.head(x).squeeze(1)


def donor_sums(values: Tensor, donors: Tensor, reference: Tensor, gaps: Tensor) -> Tensor:
    """out[b, l] = sum_k values[b, gaps[l], k] * reference[donors[b, gaps[l], k], l]: per site, the donors'
    values summed over those carrying ALT. values float [B, G, k]; donors long [B, G, k] (distinct per
    query and gap); reference float [N, L] (0/1); gaps long [L], increasing -> [B, L].

    Per gap, one sparse [B, N] (k entries a row) by dense [N, sites of the gap] product: B * L * k
    multiply-adds read straight from the reference, ~4x faster on CPU than gathering the [B, L, k] donor
    alleles first, and nothing of that size is allocated. Differentiable in ``values``."""
    return _DonorSums.apply(values, donors, reference, gaps)


class _DonorSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, donors: Tensor, reference: Tensor, gaps: Tensor) -> Tensor:  # type: ignore[override]
        b, g, k = values.shape
        bounds = _gap_bounds(gaps, g)
        cols, order = donors.sort(dim=-1)  # CSR wants each row's columns in increasing order
        vals = values.gather(2, order)
        crow = torch.arange(0, b * k + 1, k, device=values.device)
        out = values.new_zeros(b, reference.shape[1])
        for gap, (lo, hi) in enumerate(bounds):
            if hi > lo:
                matrix = torch.sparse_csr_tensor(
                    crow, cols[:, gap].reshape(-1), vals[:, gap].reshape(-1), size=(b, reference.shape[0]), check_invariants=False
                )
                out[:, lo:hi] = matrix @ reference[:, lo:hi]
        ctx.save_for_backward(donors, reference)
        ctx.bounds = bounds
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        donors, reference = ctx.saved_tensors
        out = grad.new_zeros(donors.shape)
        for gap, (lo, hi) in enumerate(ctx.bounds):
            if hi > lo:  # d out[b, l] / d values[b, gap, j] = reference[donors[b, gap, j], l]
                out[:, gap] = (grad[:, lo:hi] @ reference[:, lo:hi].t()).gather(1, donors[:, gap])
        return out, None, None, None


def _gap_bounds(gaps: Tensor, n_gaps: int) -> list[tuple[int, int]]:
    edges = torch.searchsorted(gaps, torch.arange(n_gaps + 1, device=gaps.device)).tolist()
    return list(itertools.pairwise(edges))


def imputation_loss(logits: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Mean binary cross-entropy over masked (untyped) sites (0 when nothing is masked)."""
    if not bool(masked.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[masked].float(), target[masked].float())
