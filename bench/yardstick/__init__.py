"""The predecessor's retrieval, kept only to measure rag_hpc's against (DESIGN.md §2).

- ``embedding``: its per-position SiteEmbedding;
- ``lxd``: its flattened L×D embeddings, their exact distances and their FAISS IndexFlatL2 (the definition);
- ``fixed_mask``: ``FixedMaskIndex``, the same top-k as a FAISS index of one float per observed site.

tests/test_retrieval.py proves these and ``rag_hpc.index.retrieval.masked_topk`` return the same top-k,
ties included; bench/index_bench.py measures their size and speed. They need faiss (the ``test`` or
``bench`` extra), which no pipeline job imports.
"""
