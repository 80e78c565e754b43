"""What queries see: one array's sites, a pure function of its counters (same in any process)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from rag_hpc.config import MaskConfig
from rag_hpc.data.masks import simulated_array, sites_digest
from rag_hpc.rng import Stream, uniforms

AF = np.where(np.arange(20_000) % 4 == 0, 0.01, 0.3).astype(np.float32)  # a quarter of the sites rare


def test_the_simulated_array_is_identical_in_a_fresh_process():
    script = (
        "import numpy as np; from rag_hpc.config import MaskConfig; import tests.test_masks as t; "
        "from rag_hpc.data.masks import simulated_array, sites_digest; print(sites_digest(simulated_array(MaskConfig(seed=11), t.AF)))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out == sites_digest(simulated_array(MaskConfig(seed=11), AF))


def test_the_simulated_array_types_common_sites_only_at_its_density():
    cfg = MaskConfig(seed=0, array_density=0.025, af_threshold=0.05)
    typed = simulated_array(cfg, AF)
    assert np.all(np.diff(typed) > 0) and typed.dtype == np.int64
    assert not (typed % 4 == 0).any()  # arrays are designed on common variants
    assert abs(typed.size / AF.size - 0.025) < 0.003
    assert not np.array_equal(typed, simulated_array(MaskConfig(seed=1), AF))  # the seed changes it


def test_uniforms_look_uniform_and_independent():
    u = uniforms(0, Stream.ARRAY_SITES, 5, np.arange(2000), 0, 511)
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.15
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert counts.min() > 0.98 * u.size / 10
