"""One registry of random streams: every stream id distinct, and stages that draw from different
streams make independent choices even under the default seeds (masks.seed == train.seed == 0)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rag_hpc.config import MaskConfig, TrainConfig
from rag_hpc.index.donors import training_queries
from rag_hpc.rng import Stream, uniforms
from rag_hpc.train.sampler import WindowBatchSampler

# Under independence z = r * sqrt(N) is ~N(0, 1) for large N; P(|z| >= 4.5) = 6.8e-6 two-sided
# (about 1.4e-5 for the two checks together). Everything here is seeded, so the outcome is fixed.
Z_MAX = 4.5


def _pearson_z(x: np.ndarray, y: np.ndarray) -> float:
    r = np.corrcoef(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))[0, 1]
    return float(r * math.sqrt(len(x)))


def test_every_stream_id_is_distinct_and_the_hash_refuses_bare_ints():
    members = Stream.__members__  # includes aliases, which iterating the enum would hide
    values = [int(m) for m in members.values()]
    assert len(values) == len(set(values)), f"two streams share an id: {dict(members)}"
    assert {"ARRAY_SITES", "WINDOW_ORDER", "HAPLOTYPE_ORDER", "DROPOUT", "TRAIN_QUERIES"} <= set(members)
    haps = np.arange(4, dtype=np.uint64)
    draws = {s: uniforms(0, s, 0, haps, 0, 3).tobytes() for s in Stream}
    assert len(set(draws.values())) == len(Stream)  # distinct ids, distinct numbers
    with pytest.raises(TypeError, match="stream"):
        uniforms(0, 4, 0, haps, 0, 3)  # a bare int, even one equal to Stream.ARRAY_SITES, is a bug
    with pytest.raises(TypeError, match="stream"):
        uniforms(0, np.int64(4), 0, haps, 0, 3)


def test_a_samples_pick_as_training_query_is_independent_of_its_batch_position():
    train_cfg = TrainConfig()
    assert MaskConfig().seed == train_cfg.seed == 0  # the defaults, under which colliding streams coincide exactly
    n_windows, epochs, batch_size = 8, 4, 50
    train_haps = np.arange(2000, dtype=np.int64)
    picked = np.zeros(train_haps.size, bool)
    picked[training_queries(train_haps, 500, train_cfg.seed)] = True
    assert picked.sum() == 1000 and np.array_equal(picked[0::2], picked[1::2])  # whole samples
    sampler = WindowBatchSampler(n_windows, train_haps, batch_size, seed=train_cfg.seed, mix_windows=2)
    used = sampler.batches_per_window * batch_size

    position, pick, collided_position, collided_pick = [], [], [], []
    for epoch in range(epochs):
        for index in range(sampler.batches_per_epoch):
            mb = sampler.batch(epoch, index)
            _, number = sampler.locate(index)
            position.append((number * batch_size + np.arange(batch_size)) / used)
            pick.append(picked[mb.haplotypes])
        for window in range(n_windows):
            # Power check: a pick drawn from the sampler's own stream (the bug the registry prevents).
            keys = uniforms(train_cfg.seed, Stream.HAPLOTYPE_ORDER, window, np.arange(len(train_haps)), epoch, 1)[:, 0]
            rank = np.empty(len(keys), dtype=np.int64)
            rank[np.argsort(keys, kind="stable")] = np.arange(len(keys))
            collided_position.append(rank / len(keys))
            collided_pick.append(keys < 0.5)
    position, pick = np.concatenate(position), np.concatenate(pick)
    n = len(position)
    assert n == epochs * n_windows * used and 0.45 < pick.mean() < 0.55

    z_pick = _pearson_z(position, pick)
    assert abs(z_pick) < Z_MAX, f"training-query pick correlates with batch position: z = {z_pick:.2f} over {n}"

    # The same check detects a shared stream by a wide margin (r = -0.87, z ~ -300), so passing above means something.
    z_collided = _pearson_z(np.concatenate(collided_position)[:n], np.concatenate(collided_pick)[:n])
    assert z_collided < -5 * Z_MAX, f"the power check failed to detect a shared stream: z = {z_collided:.2f}"
