"""The Embedding-RAG model: what it may see, what it may not, and where gradients go."""

from __future__ import annotations

import torch

from rag_hpc.config import ModelConfig
from rag_hpc.index.retrieval import own_sample_exclusion
from rag_hpc.model.embedding import SiteEmbedding
from rag_hpc.model.rag import RagImputer, allele_tokens, imputation_loss, retrieve

CFG = ModelConfig(dims=32, layers=2, heads=4, k=4, match_scales=[2, 8])


def _panel(n: int = 60, length: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    founders = (torch.rand(6, length, generator=g) < 0.4).to(torch.uint8)
    haps = founders[torch.randint(0, 6, (n,), generator=g)].clone()
    flips = torch.rand(n, length, generator=g) < 0.05
    return torch.where(flips, 1 - haps, haps)


def test_embedding_is_strictly_per_position():
    torch.manual_seed(0)
    emb = SiteEmbedding(32, 64)
    tokens = allele_tokens(_panel(2, 40)[:1])
    af = torch.rand(41)
    changed = tokens.clone()
    changed[0, 7] = 11 - changed[0, 7]  # REF <-> ALT at one site
    diff = (emb(changed, af) - emb(tokens, af)).abs().sum(-1)[0]
    assert diff[7] > 0 and torch.count_nonzero(diff) == 1


def test_hidden_alleles_cannot_influence_the_prediction():
    torch.manual_seed(0)
    model = RagImputer(CFG, 64).eval()
    ref = _panel()
    af = ref.float().mean(0)
    query = ref[:3].clone()
    masked = torch.rand(3, 40, generator=torch.Generator().manual_seed(1)) < 0.5
    retrieved = ref[10:22].view(3, 4, 40)
    out = model(query.long(), masked, af, retrieved.long())
    flipped = torch.where(masked, 1 - query, query)
    assert torch.equal(out, model(flipped.long(), masked, af, retrieved.long()))


def test_a_query_never_retrieves_itself_or_its_sample_mate():
    torch.manual_seed(0)
    model = RagImputer(CFG, 64)
    ref = _panel()
    query_ids = torch.tensor([0, 1, 17, 33])
    observed = torch.ones(4, 40, dtype=torch.bool)  # fully observed: self would be at distance 0
    exclude = own_sample_exclusion(query_ids, torch.arange(len(ref)))
    idx, alleles = retrieve(model, ref[query_ids], observed, ref, ref.float().mean(0), 4, exclude)
    assert not (idx // 2 == (query_ids // 2)[:, None]).any()
    assert torch.equal(alleles, ref[idx])


def test_gradients_reach_the_embedding_through_the_retrieved_haplotypes():
    torch.manual_seed(0)
    model = RagImputer(CFG, 64)
    ref = _panel()
    af = ref.float().mean(0)
    query = ref[:4]
    masked = torch.ones(4, 40, dtype=torch.bool)  # the query shows nothing: all signal is retrieved
    retrieved = ref[20:36].view(4, 4, 40)
    loss = imputation_loss(model(query.long(), masked, af, retrieved.long()), query, masked)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.embed.token.weight.grad[5:7].abs().sum() > 0  # REF/ALT rows: only retrieved tokens carry them


def test_loss_is_zero_without_masked_sites_and_positive_with():
    logits = torch.zeros(2, 5, requires_grad=True)
    target = torch.ones(2, 5, dtype=torch.uint8)
    assert imputation_loss(logits, target, torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0
    assert abs(imputation_loss(logits, target, torch.ones(2, 5, dtype=torch.bool)).item() - 0.6931) < 1e-3


def test_retrieval_ranks_by_the_current_embeddings_site_weights():
    torch.manual_seed(0)
    model = RagImputer(CFG, 64)
    af = torch.rand(40)
    w = model.site_weights(af)
    e = model.embed.allele_embeddings(af)
    assert torch.allclose(w, ((e[1] - e[0]) ** 2).sum(-1).double(), rtol=1e-5)
    assert w.shape == (40,) and not w.requires_grad
