"""Imputation targets: a phased array VCF matched to the panel's sites.

One owner for what a target haplotype is to every stage: the typed sites training's queries are masked to
(``WindowCache.array_sites``), the donor tables the index prebuild computes for the targets
(``rag_hpc.index.donors``) and what ``impute`` fills in all come from ``match_targets`` under the one
``data.ambiguous`` policy, so the sites a model was trained on are the sites it is given.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from rag_hpc.data.vcf import VcfError, match_sites, read_phased_vcf, same_chromosome

if TYPE_CHECKING:
    from rag_hpc.data.panel import Panel
    from rag_hpc.data.vcf import PhasedVcf

AmbiguousPolicy = Literal["skip", "keep"]

FIX_PHASE_TARGETS = (
    "phase the targets first, against the same panel: "
    "`beagle gt=targets.vcf.gz ref=panel.vcf.gz impute=false out=phased` (Debian package beagle) "
    "or `shapeit4 --input targets.vcf.gz --reference panel.vcf.gz --region CHR --output phased.vcf.gz` "
    "(Debian package shapeit4)"
)
FIX_BUILD = (
    "the targets and the panel are probably on different genome builds (e.g. GRCh37 vs GRCh38): lift the targets "
    "over to the panel's build first (e.g. `bcftools +liftover` or CrossMap)"
)


@dataclass(frozen=True)
class TargetSites:
    """Targets reduced to what the predictor sees: their usable sites as panel indices and their alleles
    in the panel's REF/ALT coding."""

    samples: list[str]
    panel_index: np.ndarray  # int64 [n_used], strictly increasing
    haplotypes: np.ndarray  # uint8 [2 * n_samples, n_used]; haplotype 2*s is sample s's first allele
    counts: dict[str, int]

    def describe(self) -> str:
        c = self.counts
        parts = [f"{c['used']:,} of {c['target_sites']:,} target sites used"]
        if c["swapped"] or c["strand_flipped"]:
            parts.append(f"{c['swapped']:,} REF/ALT-swapped and {c['strand_flipped']:,} strand-flipped among them")
        skipped = [
            (c["ambiguous_skipped"], "strand-ambiguous (A/T, C/G)"),
            (c["not_in_panel"], "at positions not in the panel"),
            (c["allele_mismatch"], "with alleles that fit no orientation of the panel's"),
            (c["non_snps_skipped"], "non-SNP records"),
        ]
        parts += [f"{n:,} skipped {what}" for n, what in skipped if n]
        return "; ".join(parts)

    def digest(self) -> str:
        """Content id of the typed sites and the alleles on them: the key of the targets' donor tables, so a
        table is never read for other targets, or for the same file matched under another policy."""
        h = hashlib.sha256()
        for a in (self.panel_index.astype(np.int64), np.int64(self.haplotypes.shape), self.haplotypes):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def _read_targets(targets_vcf: Path, skip_non_snps: bool) -> PhasedVcf:
    try:
        return read_phased_vcf(targets_vcf, skip_non_snps=skip_non_snps)
    except VcfError as exc:
        message = str(exc)
        # The reader's fixes are worded for a panel; for targets the step that fixes both unphased and missing
        # calls is phasing against the panel. (Matched on the message: vcf.py has no subclass per problem.)
        if "unphased genotype" in message:
            head = message.split("; the VCF must be phased")[0]
            raise VcfError(f"{targets_vcf}: targets must be phased ({head}); {FIX_PHASE_TARGETS}") from None
        if "missing genotype" in message:
            head = message.split("; the panel must")[0]
            raise VcfError(
                f"{targets_vcf}: targets must have no missing calls ({head}); phasing fills them: {FIX_PHASE_TARGETS}"
            ) from None
        raise


def match_targets(
    panel: Panel, targets_vcf: str | os.PathLike[str], *, ambiguous: AmbiguousPolicy = "skip", skip_non_snps: bool = False
) -> TargetSites:
    """Read phased targets and match their sites to the panel by position and alleles.

    REF/ALT-swapped sites are used with their alleles flipped; strand-flipped sites are used as they are
    (the complement leaves the allele coding unchanged); strand-ambiguous A/T and C/G sites, where a swap and
    a strand flip cannot be told apart, are skipped unless ``ambiguous="keep"`` (then read as same-strand).
    Raises VcfError when the targets are unphased, on another contig, or share no usable site with the panel.
    """
    if ambiguous not in ("skip", "keep"):
        raise ValueError(f"ambiguous must be 'skip' or 'keep', got {ambiguous!r}")
    path = Path(targets_vcf)
    targets = _read_targets(path, skip_non_snps)
    if not same_chromosome(targets.contig, panel.info.contig):
        raise VcfError(
            f"{path}: contig {targets.contig} but the panel {panel.path} is contig {panel.info.contig}; use targets and "
            "panel of the same chromosome"
        )
    match = match_sites(panel.positions, panel.ref, panel.alt, targets.pos, targets.ref, targets.alt)
    at_panel_pos = np.isin(targets.pos, panel.positions)
    skip_ambiguous = match.ambiguous if ambiguous == "skip" else np.zeros_like(match.ambiguous)
    used = match.matched & ~skip_ambiguous
    counts = {
        "target_sites": targets.n_sites,
        "used": int(used.sum()),
        "swapped": int((used & match.swapped).sum()),
        "strand_flipped": int((used & match.flipped).sum()),
        "ambiguous_skipped": int((match.matched & skip_ambiguous).sum()),
        "ambiguous_kept": int((used & match.ambiguous).sum()),
        "not_in_panel": int((~at_panel_pos).sum()),
        "allele_mismatch": int((at_panel_pos & ~match.matched).sum()),
        "non_snps_skipped": targets.n_skipped_non_snps,
    }
    if not used.any():
        span = f"targets {targets.contig}:{targets.pos[0]}-{targets.pos[-1]}, panel {panel.info.contig}:{panel.positions[0]}-{panel.positions[-1]}"
        if not match.matched.any():
            if not at_panel_pos.any():
                raise VcfError(f"{path}: none of its {targets.n_sites:,} sites is at a panel position ({span}): {FIX_BUILD}")
            raise VcfError(
                f"{path}: {counts['allele_mismatch']:,} of its sites share a position with the panel but none has the panel's "
                f"alleles in any orientation ({span}): {FIX_BUILD}"
            )
        raise VcfError(
            f"{path}: all {counts['ambiguous_skipped']:,} sites it shares with the panel are strand-ambiguous (A/T or C/G) "
            "and were skipped, so nothing is observed; if the targets are on the panel's strand, keep them "
            "(--ambiguous keep), else align them first (e.g. `bcftools +fixref`)"
        )
    haps = targets.haplotypes()[:, used]
    haps[:, match.swapped[used]] ^= 1
    return TargetSites(list(targets.samples), match.index[used], np.ascontiguousarray(haps), counts)
