"""The VCF writer publishes a bgzipped VCF and its tabix index whole, or leaves what was there."""

from __future__ import annotations

import os

import numpy as np
import pysam
import pytest

from rag_hpc.data.vcf import VcfWriter, read_phased_vcf
from rag_hpc.fsutil import temporaries


def _write(path, pos, fail: bool = False) -> None:
    gt = np.zeros((len(pos), 2, 2), np.int8)
    gt[:, 1, 0] = 1
    with VcfWriter(path, contig="21", samples=["a", "b"]) as out:
        out.write_phased(np.array(pos), np.full(len(pos), "A"), np.full(len(pos), "G"), gt)
        if fail:
            raise KeyboardInterrupt  # a job cancelled mid-write


def test_a_write_that_fails_leaves_the_published_vcf_and_index_as_they_were(tmp_path):
    path = tmp_path / "out.vcf.gz"
    _write(path, [100, 200, 300])
    before = path.read_bytes(), (tmp_path / "out.vcf.gz.tbi").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        _write(path, [5, 6], fail=True)
    assert (path.read_bytes(), (tmp_path / "out.vcf.gz.tbi").read_bytes()) == before
    assert temporaries(tmp_path) == []
    _write(path, [7, 8])
    assert read_phased_vcf(path).pos.tolist() == [7, 8] and temporaries(tmp_path) == []
    with pysam.TabixFile(str(path)) as tabix:  # the index published with it is the new VCF's
        assert [line.split("\t")[1] for line in tabix.fetch("21", 7, 8)] == ["8"]


def test_the_published_vcf_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        _write(tmp_path / "out.vcf.gz", [100])
    finally:
        os.umask(old)
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("out.vcf.gz", "out.vcf.gz.tbi")} == {0o640}
