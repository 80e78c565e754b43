"""The donor imputer: an untrained model is the Li–Stephens copy, hidden alleles cannot reach it, and
gradients reach every correction."""

from __future__ import annotations

import torch

from rag_hpc.config import ModelConfig
from rag_hpc.model.rag import DonorImputer, imputation_loss

CFG = ModelConfig(dims=16, layers=2, kernel=3, k=4)


def _inputs(b: int = 3, length: int = 40, gaps: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    alleles = (torch.rand(b, length, CFG.k, generator=g) < 0.3).float()
    weights = torch.rand(b, gaps, CFG.k, generator=g)
    weights = weights / weights.sum(-1, keepdim=True)
    site_gaps = torch.sort(torch.randint(0, gaps, (length,), generator=g)).values
    query = (torch.rand(b, length, generator=g) < 0.3).long()
    observed = torch.rand(length, generator=g) < 0.2
    maf = torch.rand(length, generator=g) * 0.5
    return alleles, weights, site_gaps, query, observed, maf


def test_an_untrained_model_predicts_the_weighted_mean_of_its_donors_alleles():
    torch.manual_seed(0)
    alleles, weights, gaps, query, observed, maf = _inputs()
    p = torch.sigmoid(DonorImputer(CFG).eval()(alleles, weights, gaps, query, observed, maf))
    copy = (alleles * weights[:, gaps]).sum(-1).clamp(1e-4, 1 - 1e-4)
    assert torch.allclose(p, copy, atol=1e-6)


def test_hidden_alleles_cannot_influence_the_prediction():
    torch.manual_seed(0)
    model = DonorImputer(CFG).eval()
    with torch.no_grad():  # trained-looking weights: every correction active
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    alleles, weights, gaps, query, observed, maf = _inputs()
    out = model(alleles, weights, gaps, query, observed, maf)
    flipped = torch.where(observed, query, 1 - query)  # every untyped allele of the query flipped
    assert torch.equal(out, model(alleles, weights, gaps, flipped, observed, maf))
    typed_flipped = torch.where(observed, 1 - query, query)
    assert not torch.equal(out, model(alleles, weights, gaps, typed_flipped, observed, maf))  # typed ones are read


def test_gradients_reach_the_donor_scores_and_the_residual_network():
    torch.manual_seed(0)
    model = DonorImputer(CFG)
    alleles, weights, gaps, query, observed, maf = _inputs()
    masked = ~observed.expand(query.shape[0], -1)
    imputation_loss(model(alleles, weights, gaps, query, observed, maf), query, masked).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The zero-initialised output layers get a gradient at once; the layers before them follow.
    assert model.gap_score[-1].weight.grad.abs().sum() > 0 and model.head[-1].weight.grad.abs().sum() > 0


def test_loss_is_zero_without_masked_sites_and_positive_with():
    logits = torch.zeros(2, 5, requires_grad=True)
    target = torch.ones(2, 5, dtype=torch.uint8)
    assert imputation_loss(logits, target, torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0
    assert abs(imputation_loss(logits, target, torch.ones(2, 5, dtype=torch.bool)).item() - 0.6931) < 1e-3
