"""Masks are pure functions of their counters: same inputs, same mask, in any process."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np

from rag_hpc.config import MaskConfig
from rag_hpc.data.masks import array_mask, curriculum_rate, train_mask, val_mask
from rag_hpc.rng import Stream, uniforms

AF = np.linspace(0.0, 1.0, 511, dtype=np.float32)


def _digest(cfg: MaskConfig) -> str:
    parts = [train_mask(cfg, w, np.arange(40), e, AF).tobytes() for w in (0, 7) for e in (0, 5)]
    parts.append(val_mask(cfg, 7, 511).tobytes())
    return hashlib.sha256(b"".join(parts)).hexdigest()


def test_masks_are_identical_in_a_fresh_process():
    script = (
        "import numpy as np, hashlib; from rag_hpc.config import MaskConfig; "
        "import tests.test_masks as t; print(t._digest(MaskConfig(seed=11)))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out == _digest(MaskConfig(seed=11))


def test_a_haplotypes_mask_does_not_depend_on_its_batch():
    cfg = MaskConfig(seed=3)
    batch = train_mask(cfg, 2, np.array([9, 4, 100]), 1, AF)
    alone = train_mask(cfg, 2, np.array([100]), 1, AF)
    assert np.array_equal(batch[2], alone[0])


def test_masks_change_with_seed_window_haplotype_and_epoch():
    cfg = MaskConfig(seed=0)
    ref = train_mask(cfg, 0, np.array([0]), 0, AF)
    assert not np.array_equal(ref, train_mask(MaskConfig(seed=1), 0, np.array([0]), 0, AF))
    assert not np.array_equal(ref, train_mask(cfg, 1, np.array([0]), 0, AF))
    assert not np.array_equal(ref, train_mask(cfg, 0, np.array([1]), 0, AF))
    assert not np.array_equal(ref, train_mask(cfg, 0, np.array([0]), 1, AF))


def test_uniforms_look_uniform_and_independent():
    u = uniforms(0, Stream.TRAIN_MASK, 5, np.arange(2000), 0, 511)
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.15
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert counts.min() > 0.98 * u.size / 10


def test_rare_sites_are_masked_at_least_at_the_rare_rate():
    cfg = MaskConfig(seed=0, levels=[0.1], rare_rate=0.7, af_threshold=0.05, array_share=0.0)
    af = np.where(np.arange(511) % 2 == 0, 0.01, 0.3).astype(np.float32)
    m = train_mask(cfg, 0, np.arange(4000), 0, af)
    assert abs(m[:, 0::2].mean() - 0.7) < 0.01  # rare sites (MAF 0.01)
    assert abs(m[:, 1::2].mean() - 0.1) < 0.01  # common sites at the level's rate
    high_af = np.full(511, 0.99, dtype=np.float32)  # MAF 0.01: rare although AF is high
    assert abs(train_mask(cfg, 0, np.arange(2000), 0, high_af).mean() - 0.7) < 0.01


def test_curriculum_steps_every_epochs_per_level_and_stays_at_the_last_level():
    cfg = MaskConfig(levels=[0.1, 0.3, 0.8], epochs_per_level=2)
    assert [curriculum_rate(e, cfg) for e in range(8)] == [0.1, 0.1, 0.3, 0.3, 0.8, 0.8, 0.8, 0.8]


def test_validation_mask_is_fixed_per_window_at_its_rate():
    cfg = MaskConfig(seed=0, val_rate=0.5)
    rates = [val_mask(cfg, w, 511).mean() for w in range(50)]
    assert abs(np.mean(rates) - 0.5) < 0.01
    assert np.array_equal(val_mask(cfg, 4, 511), val_mask(cfg, 4, 511))
    assert not np.array_equal(val_mask(cfg, 4, 511), val_mask(cfg, 5, 511))


def test_array_share_of_haplotypes_see_only_common_sites_at_the_array_density():
    cfg = MaskConfig(seed=0, levels=[0.3], array_share=0.5, array_density=0.025, af_threshold=0.05)
    af = np.where(np.arange(511) % 4 == 0, 0.01, 0.3).astype(np.float32)  # a quarter rare
    m = train_mask(cfg, 0, np.arange(2000), 0, af)
    array_like = m.mean(axis=1) > 0.9
    assert abs(array_like.mean() - 0.5) < 0.05
    observed = ~m[array_like]
    assert not observed[:, 0::4].any()  # arrays type common sites only
    assert abs(observed.sum(axis=1).mean() - 0.025 * 511) < 1.0


def test_a_known_target_array_is_the_array_mask():
    cfg = MaskConfig(seed=0, array_share=1.0)
    typed = np.zeros(511, dtype=bool)
    typed[::40] = True
    m = train_mask(cfg, 3, np.arange(8), 2, AF, typed)
    assert np.array_equal(m, np.broadcast_to(~typed, m.shape))
    assert np.array_equal(array_mask(cfg, 3, np.arange(8), 2, AF, typed), m)
