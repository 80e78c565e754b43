"""One registry of random streams: every stream id distinct, and stages that draw from different
streams make independent choices even under the default seeds (masks.seed == train.seed == 0)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rag_hpc.config import MaskConfig, TrainConfig
from rag_hpc.data.masks import array_mask, train_mask
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
    assert {"TRAIN_MASK", "VAL_MASK", "ARRAY_PICK", "ARRAY_SITES", "WINDOW_ORDER", "HAPLOTYPE_ORDER", "DROPOUT"} <= set(members)
    haps = np.arange(4, dtype=np.uint64)
    draws = {s: uniforms(0, s, 0, haps, 0, 3).tobytes() for s in Stream}
    assert len(set(draws.values())) == len(Stream)  # distinct ids, distinct numbers
    with pytest.raises(TypeError, match="stream"):
        uniforms(0, 3, 0, haps, 0, 3)  # a bare int, even one equal to Stream.ARRAY_PICK, is a bug
    with pytest.raises(TypeError, match="stream"):
        uniforms(0, np.int64(3), 0, haps, 0, 3)


def test_a_haplotypes_array_pick_and_typed_sites_are_independent_of_its_batch_position():
    masks_cfg, train_cfg = MaskConfig(), TrainConfig()
    assert masks_cfg.seed == train_cfg.seed == 0  # the defaults, under which colliding streams coincide exactly
    n_windows, epochs, batch_size, length = 8, 4, 50, 64
    # Contiguous ids: the sampler keys a haplotype by its index in train_haps, the masks by its id,
    # so the old collision was exact where the two agree (a panel's haplotypes before its first
    # validation sample). The power check below needs them to agree to show what it would catch.
    train_haps = np.arange(1000, dtype=np.int64)
    af = np.full(length, 0.3, dtype=np.float32)  # all sites common: any of them may be typed
    sampler = WindowBatchSampler(n_windows, train_haps, batch_size, seed=train_cfg.seed, mix_windows=2)
    used = sampler.batches_per_window * batch_size

    position, pick, typed0, collided_position = [], [], [], []
    for epoch in range(epochs):
        for index in range(sampler.batches_per_epoch):
            mb = sampler.batch(epoch, index)
            _, number = sampler.locate(index)
            position.append((number * batch_size + np.arange(batch_size)) / used)
            arrays = array_mask(masks_cfg, mb.window, mb.haplotypes, epoch, af)
            trained = train_mask(masks_cfg, mb.window, mb.haplotypes, epoch, af)
            pick.append((trained == arrays).all(axis=1))  # an array-shaped training mask
            typed0.append(~arrays[:, 0])  # the array typed the first site
        for window in range(n_windows):
            # Power check: the old code's collision, the batch order drawn from the array-sites stream
            # (the old sampler's keys: counters = index in train_haps, site 0).
            keys = uniforms(train_cfg.seed, Stream.ARRAY_SITES, window, np.arange(len(train_haps)), epoch, 1)[:, 0]
            rank = np.empty(len(keys), dtype=np.int64)
            rank[np.argsort(keys, kind="stable")] = np.arange(len(keys))
            arrays = array_mask(masks_cfg, window, train_haps, epoch, af)
            collided_position.append((rank / len(keys), ~arrays[:, 0]))
    position, pick, typed0 = np.concatenate(position), np.concatenate(pick), np.concatenate(typed0)
    n = len(position)
    assert n == epochs * n_windows * used
    assert 0.4 < pick.mean() < 0.6 and 0.015 < typed0.mean() < 0.035  # array_share 0.5, density 0.025

    z_pick, z_typed = _pearson_z(position, pick), _pearson_z(position, typed0)
    assert abs(z_pick) < Z_MAX, f"array pick correlates with batch position: z = {z_pick:.2f} over {n}"
    assert abs(z_typed) < Z_MAX, f"typed sites correlate with batch position: z = {z_typed:.2f} over {n}"

    # The same check on the same number of haplotypes detects a shared stream by a wide margin
    # (expected r = -sqrt(3 p (1 - p)) = -0.27 at p = 0.025, z ~ -48), so passing above means something.
    old_position = np.concatenate([p for p, _ in collided_position])[:n]
    old_typed0 = np.concatenate([t for _, t in collided_position])[:n]
    z_collided = _pearson_z(old_position, old_typed0)
    assert z_collided < -5 * Z_MAX, f"the power check failed to detect a shared stream: z = {z_collided:.2f}"
