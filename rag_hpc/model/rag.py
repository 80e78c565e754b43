"""Retrieval-augmented imputer: per-site attention over Li–Stephens donors, then a residual network.

Per batch (query haplotypes of one window, typed at one array's sites):

1. retrieval (``rag_hpc.index.donors``, outside the model): for every gap between typed sites, each
   query's k donors — the reference haplotypes the Li–Stephens HMM over *all* the chromosome's typed sites
   says it copies from there — with their posterior weights w;
2. per site, attention over the gap's donors: score = log w + a learned correction from the weight and
   the donor's rank (per gap) and from the donor's allele and the site's MAF (per site); P_copy = Σ α ·
   donor allele — the copy Li–Stephens does, re-weighted where training shows it over- or under-trusts;
3. a residual network over the sites of the window (per-site features — among them the copies the
   neighbouring gaps' donors make at the site and how far through its gap the site lies, so it can
   blend them as the HMM's posterior moves across a gap — then 1-D convolutions over neighbouring
   sites) adds a logit correction for what the donors miss (calibration by frequency, disagreement
   among donors, the typed neighbours);
4. loss: binary cross-entropy on the untyped sites, on logits.

Both learned corrections start at exactly zero, so an untrained model *is* the copy predictor with k
donors: training starts from Li–Stephens and can only be kept if it validates better. The attention
costs three sparse products per gap, O(B·L·k) multiply-adds (``donor_sums``: nothing of size
[B, L, k] is built), the residual network O(B·L·D²); both small next to the HMM that finds the donors.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rag_hpc.config import ModelConfig
from rag_hpc.model.layers import Layer, layers, parameter_shapes

# Probabilities are kept inside [EPS, 1 - EPS] before the logit: a copy that every donor agrees on
# would otherwise be an infinite logit.
EPS = 1e-4

# donor_sums builds CSR matrices; torch warns once per process that its CSR support is 'beta'.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _build(layer: Layer) -> nn.Module:
    if layer.width:
        built: nn.Module = nn.Conv1d(layer.inputs, layer.outputs, layer.width, padding=layer.width // 2, bias=layer.bias)
    else:
        built = nn.Linear(layer.inputs, layer.outputs, bias=layer.bias)
    if layer.zero:
        for p in built.parameters():
            nn.init.zeros_(p)
    return built


class DonorImputer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        table = layers(cfg)
        self.gap_hidden = _build(table["gap_hidden"])
        self.gap_score = _build(table["gap_score"])
        self.allele_score = _build(table["allele_score"])
        # Sites along the last axis throughout ([B, D, L]), so every layer is a contiguous Conv1d.
        self.inp = _build(table["inp"])
        self.mix = nn.ModuleList(_build(table[f"mix.{i}"]) for i in range(cfg.layers))
        self.head = _build(table["head"])
        held, stated = {name: tuple(p.shape) for name, p in self.named_parameters()}, parameter_shapes(cfg)
        if held != stated:
            differ = sorted(n for n in held.keys() | stated.keys() if held.get(n) != stated.get(n))
            raise RuntimeError(
                f"DonorImputer's parameters {differ} differ from rag_hpc.model.layers: state every learned "
                "layer there (the guard counts checkpoints from it)"
            )

    def forward(
        self,
        reference: Tensor,
        donors: Tensor,
        weights: Tensor,
        gaps: Tensor,
        along: Tensor,
        query: Tensor,
        observed: Tensor,
        maf: Tensor,
    ) -> Tensor:
        """reference float [N, L]: the window's reference alleles (0/1); donors long [B, G, k]: each query's
        donors (rows of ``reference``) per gap, heaviest first, and weights [B, G, k] their weights; gaps
        long [L], increasing: each site's gap (donors and weights of site l are those of gap gaps[l]); along
        [L] how far each site lies through its gap (0..1, ``DonorTable.along``); query
        [B, L] the query's alleles (read at typed sites only); observed [L] bool: typed sites; maf [L]
        -> ALT logits [B, L]."""
        b, length = query.shape
        k = donors.shape[-1]
        w = weights.float()
        log_w = torch.log(w.clamp(min=1e-6))
        rank = (torch.arange(k, device=log_w.device, dtype=torch.float32) / k).expand_as(log_w)  # donors come heaviest first
        score = log_w + self.gap_score(F.relu(self.gap_hidden(torch.stack([log_w / 10, rank], dim=-1)))).squeeze(-1)  # [B, G, k]
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
        # The copies the neighbouring gaps' donors make here (their HMM weights), in the same products.
        s1, w_prev, w_next = donor_sums(torch.stack([e, w, w]), donors, reference, gaps, (0, -1, 1))  # [B, L] each
        e_site = e_all[:, gaps]
        eb = torch.exp(bias)
        p = (eb * s1 / ((e_site - s1).clamp(min=0.0) + eb * s1)).clamp(EPS, 1 - EPS)
        logit = torch.logit(p)
        # The neighbouring gaps' copies and how far through its gap the site lies: the HMM's posterior
        # moves from one gap's donors to the next across a gap, which one weight vector per gap (taken at
        # its middle) cannot follow; the network learns how to blend them.
        p_prev, p_next = w_prev.clamp(EPS, 1 - EPS), w_next.clamp(EPS, 1 - EPS)
        typed = observed.float().expand(b, length)
        known = torch.where(observed, 2 * query.float() - 1, torch.zeros_like(p))  # ±1 at typed sites
        features = torch.stack(
            [
                logit / 5,
                p,
                entropy[:, gaps],
                1.0 / e_site,
                log_maf.expand(b, length),
                typed,
                known,
                (2 * p - 1) * known,
                (torch.logit(p_prev) - logit) / 5,
                (torch.logit(p_next) - logit) / 5,
                along.float().expand(b, length),
            ],
            dim=1,
        )
        x = self.inp(features)  # [B, D, L]
        drop = self.cfg.dropout if self.training else 0.0
        for conv in self.mix:
            x = x + F.dropout(F.relu(conv(x)), drop, self.training)
        # ReLU, not GELU: on CPU the activations were a fifth of the imputation's model time.
        return logit + self.head(F.relu(x)).squeeze(1)


def donor_sums(values: Tensor, donors: Tensor, reference: Tensor, gaps: Tensor, shifts: tuple[int, ...] = (0,)) -> Tensor:
    """out[i, b, l] = sum_k values[i, b, h, k] * reference[donors[b, h, k], l] with h = gaps[l] + shifts[i]
    (clamped to the window's gaps): per site, the donors' values summed over those carrying ALT, for the
    site's own gap (shift 0) or a neighbouring one. values float [S, B, G, k]; donors long [B, G, k]
    (distinct per query and gap); reference float [N, L] (0/1); gaps long [L], increasing -> [S, B, L].

    Per gap, one sparse [S * B, N] (k entries a row) by dense [N, sites that read the gap] product:
    S * B * L * k multiply-adds read straight from the reference, ~4x faster on CPU than gathering the
    [B, L, k] donor alleles first, and nothing of that size is allocated. Differentiable in ``values``."""
    return _DonorSums.apply(values, donors, reference, gaps, shifts)


class _DonorSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, donors: Tensor, reference: Tensor, gaps: Tensor, shifts: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        n_shifts, b, g, k = values.shape
        # Per shift and gap, the (contiguous) sites that read the gap; a gap's product covers their union.
        reads = [_gap_bounds((gaps + shift).clamp(0, g - 1), g) for shift in shifts]
        cols, order = donors.sort(dim=-1)  # CSR wants each row's columns in increasing order
        vals = values.gather(3, order.expand(n_shifts, -1, -1, -1))
        cols = cols.repeat(n_shifts, 1, 1)  # row i * B + b
        crow = torch.arange(0, n_shifts * b * k + 1, k, device=values.device)
        out = values.new_zeros(n_shifts, b, reference.shape[1])
        spans = []
        for gap in range(g):
            ranges = [read[gap] for read in reads]
            used = [r for r in ranges if r[1] > r[0]]
            lo, hi = (min(r[0] for r in used), max(r[1] for r in used)) if used else (0, 0)
            spans.append((lo, hi, ranges))
            if not used:
                continue
            matrix = torch.sparse_csr_tensor(
                crow,
                cols[:, gap].reshape(-1),
                vals[:, :, gap].reshape(-1),
                size=(n_shifts * b, reference.shape[0]),
                check_invariants=False,
            )
            product = (matrix @ reference[:, lo:hi]).view(n_shifts, b, hi - lo)
            for i, (r0, r1) in enumerate(ranges):
                if r1 > r0:
                    out[i, :, r0:r1] = product[i, :, r0 - lo : r1 - lo]
        ctx.save_for_backward(donors, reference)
        ctx.spans = spans
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        donors, reference = ctx.saved_tensors
        n_shifts, b = grad.shape[:2]
        out = grad.new_zeros(n_shifts, *donors.shape)
        for gap, (lo, hi, ranges) in enumerate(ctx.spans):
            if hi <= lo:
                continue
            # d out[i, b, l] / d values[i, b, gap, j] = reference[donors[b, gap, j], l] where site l reads the gap
            local = grad.new_zeros(n_shifts, b, hi - lo)
            for i, (r0, r1) in enumerate(ranges):
                if r1 > r0:
                    local[i, :, r0 - lo : r1 - lo] = grad[i, :, r0:r1]
            every = local.reshape(n_shifts * b, hi - lo) @ reference[:, lo:hi].t()  # [S * B, N]
            out[:, :, gap] = every.view(n_shifts, b, -1).gather(2, donors[:, gap].expand(n_shifts, -1, -1))
        return out, None, None, None, None


def _gap_bounds(gaps: Tensor, n_gaps: int) -> list[tuple[int, int]]:
    edges = torch.searchsorted(gaps, torch.arange(n_gaps + 1, device=gaps.device)).tolist()
    return list(itertools.pairwise(edges))


def imputation_loss(logits: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Mean binary cross-entropy over masked (untyped) sites (0 when nothing is masked)."""
    if not bool(masked.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[masked].float(), target[masked].float())
