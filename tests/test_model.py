"""The donor imputer: an untrained model is the Li–Stephens copy, hidden alleles cannot reach it, and
gradients reach every correction."""

from __future__ import annotations

import pytest
import torch

from rag_hpc.config import ModelConfig
from rag_hpc.model import rag
from rag_hpc.model.layers import parameter_shapes
from rag_hpc.model.rag import DonorImputer, donor_sums, imputation_loss

CFG = ModelConfig(dims=16, layers=2, kernel=3, k=4)
N_REF = 12


def _inputs(b: int = 3, length: int = 40, gaps: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    reference = (torch.rand(N_REF, length, generator=g) < 0.3).float()
    donors = torch.stack([torch.randperm(N_REF, generator=g)[: CFG.k] for _ in range(b * gaps)]).view(b, gaps, CFG.k)
    weights = torch.rand(b, gaps, CFG.k, generator=g)
    weights = (weights / weights.sum(-1, keepdim=True)).sort(dim=-1, descending=True).values  # heaviest first
    site_gaps = torch.sort(torch.randint(0, gaps, (length,), generator=g)).values
    query = (torch.rand(b, length, generator=g) < 0.3).long()
    observed = torch.rand(length, generator=g) < 0.2
    maf = torch.rand(length, generator=g) * 0.5
    along = torch.rand(length, generator=g)
    return reference, donors, weights, site_gaps, along, query, observed, maf


def _donor_alleles(reference: torch.Tensor, donors: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """[B, L, k]: each donor's allele at each site, by plain indexing (the reference for donor_sums)."""
    return reference[donors[:, gaps, :], torch.arange(gaps.numel())[None, :, None]]


def test_an_untrained_model_predicts_the_weighted_mean_of_its_donors_alleles():
    torch.manual_seed(0)
    reference, donors, weights, gaps, along, query, observed, maf = _inputs()
    p = torch.sigmoid(DonorImputer(CFG).eval()(reference, donors, weights, gaps, along, query, observed, maf))
    copy = (_donor_alleles(reference, donors, gaps) * weights[:, gaps]).sum(-1).clamp(1e-4, 1 - 1e-4)
    assert torch.allclose(p, copy, atol=1e-6)


def test_donor_attention_is_a_softmax_per_site_with_the_allele_bias():
    """With the residual network's output at zero and both score corrections trained, P(ALT) is the
    per-site softmax over donors of log w + gap correction + bias(MAF) * allele, computed the long way."""
    torch.manual_seed(0)
    model = DonorImputer(CFG).eval()
    with torch.no_grad():
        for layer in (model.gap_score, model.allele_score):
            layer.weight.normal_(0, 1.0)
        model.allele_score.bias.fill_(0.7)
    reference, donors, weights, gaps, along, query, observed, maf = _inputs()
    p = torch.sigmoid(model(reference, donors, weights, gaps, along, query, observed, maf))
    log_w = torch.log(weights.clamp(min=1e-6))
    rank = (torch.arange(CFG.k) / CFG.k).expand_as(log_w)
    score = log_w + model.gap_score(torch.relu(model.gap_hidden(torch.stack([log_w / 10, rank], dim=-1)))).squeeze(-1)
    log_maf = torch.log10(maf.clamp(min=1e-4)) / 4
    bias = model.allele_score(torch.stack([log_maf, log_maf * log_maf], dim=-1)).squeeze(-1)
    alleles = _donor_alleles(reference, donors, gaps)
    alpha = (score[:, gaps] + alleles * bias[None, :, None]).softmax(-1)
    want = (alpha * alleles).sum(-1).clamp(1e-4, 1 - 1e-4)
    assert torch.allclose(p, want, atol=1e-5), (p - want).abs().max()


def test_donor_sums_match_indexing_for_each_gap_shift_and_have_exact_gradients():
    torch.manual_seed(0)
    reference, donors, _, gaps, *_ = _inputs()
    shifts = (0, -1, 1)
    values = torch.rand(len(shifts), *donors.shape, dtype=torch.float64, requires_grad=True)
    ref64 = reference.double()
    got = donor_sums(values, donors, ref64, gaps, shifts)
    for i, shift in enumerate(shifts):
        read = (gaps + shift).clamp(0, donors.shape[1] - 1)  # the gap each site reads, at the window's edges its own
        want = (_donor_alleles(ref64, donors, read) * values[i][:, read]).sum(-1)
        assert torch.allclose(got[i], want, atol=1e-12), shift
    assert torch.autograd.gradcheck(lambda v: donor_sums(v, donors, ref64, gaps, shifts), (values,))


def test_hidden_alleles_cannot_influence_the_prediction():
    torch.manual_seed(0)
    model = DonorImputer(CFG).eval()
    with torch.no_grad():  # trained-looking weights: every correction active
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    reference, donors, weights, gaps, along, query, observed, maf = _inputs()
    out = model(reference, donors, weights, gaps, along, query, observed, maf)
    flipped = torch.where(observed, query, 1 - query)  # every untyped allele of the query flipped
    assert torch.equal(out, model(reference, donors, weights, gaps, along, flipped, observed, maf))
    typed_flipped = torch.where(observed, 1 - query, query)
    assert not torch.equal(
        out, model(reference, donors, weights, gaps, along, typed_flipped, observed, maf)
    )  # typed ones are read


def test_gradients_reach_the_donor_scores_and_the_residual_network():
    torch.manual_seed(0)
    model = DonorImputer(CFG)
    reference, donors, weights, gaps, along, query, observed, maf = _inputs()
    masked = ~observed.expand(query.shape[0], -1)
    imputation_loss(model(reference, donors, weights, gaps, along, query, observed, maf), query, masked).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The zero-initialised output layers get a gradient at once; the layers before them follow.
    assert model.gap_score.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0


def test_loss_is_zero_without_masked_sites_and_positive_with():
    logits = torch.zeros(2, 5, requires_grad=True)
    target = torch.ones(2, 5, dtype=torch.uint8)
    assert imputation_loss(logits, target, torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0
    assert abs(imputation_loss(logits, target, torch.ones(2, 5, dtype=torch.bool)).item() - 0.6931) < 1e-3


def test_a_model_whose_parameters_differ_from_its_layer_table_is_refused_at_construction(monkeypatch):
    """The guard counts checkpoints from ``rag_hpc.model.layers``; a layer the table does not state stops
    the model, not the run that the guard sized too small."""
    stated = parameter_shapes(CFG)
    monkeypatch.setattr(rag, "parameter_shapes", lambda cfg: {n: s for n, s in stated.items() if n != "head.bias"})
    with pytest.raises(RuntimeError, match=r"\['head.bias'\] differ from rag_hpc.model.layers"):
        DonorImputer(CFG)
