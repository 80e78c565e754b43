"""Imputation targets: a phased array VCF matched to the panel's sites.

One owner for what a target haplotype is to every stage: the typed sites training's queries are masked to
(``WindowCache.array_sites``), the donor tables the index prebuild computes for the targets
(``rag_hpc.index.donors``) and what ``impute`` fills in all come from ``match_targets`` under the one
``data.ambiguous`` policy, so the sites a model was trained on are the sites it is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from rag_hpc.data.vcf import MissingGenotype, UnphasedGenotype, VcfError, match_sites, read_phased_vcf, same_chromosome
from rag_hpc.errors import InputError

log = logging.getLogger("rag_hpc.data")

if TYPE_CHECKING:
    from rag_hpc.data.panel import Panel
    from rag_hpc.data.vcf import PhasedVcf

AmbiguousPolicy = Literal["skip", "keep"]

FIX_PHASE_TARGETS = (
    "phase them with Beagle through rag_hpc: `python -m rag_hpc.impute --phase ...` (done anyway for unphased "
    "targets, as `launch` does), or alone: `python -m rag_hpc.phase --targets targets.vcf.gz`"
)
FIX_BUILD = (
    "the targets and the panel are probably on different genome builds (e.g. GRCh37 vs GRCh38): lift the targets "
    "over to the panel's build first (e.g. `bcftools +liftover` or CrossMap)"
)


# A target sample is a panel sample when their genotypes differ at no more than this share of the typed
# sites where either carries an ALT allele (sites where both are homozygous REF say nothing: at a rare
# site any two people agree). Duplicates of one individual differ only by genotyping error, 0.1-0.3 % on
# current arrays; relatives differ at a quarter or more of those sites, unrelated people at about half.
# The closest non-duplicate measured (a simulated target sharing both haplotypes with a panel sample over
# most of a 5 Mb region, accuracy bench) differs at 0.87 %: 0.5 % keeps it out. Genotypes, not haplotypes,
# are compared, because targets phased on their own carry switch errors a haplotype comparison would count.
OVERLAP_MAX_DISCORDANCE = 0.005
# Fewer informative sites than this for a pair say too little: the pair is judged by sample ID alone. At
# 30, two unrelated people (each site a coin toss) agree everywhere with odds of about 1e-9.
OVERLAP_MIN_SITES = 30
_OVERLAP_SCREEN_SITES = 512  # sites a first pass compares over every pair (the candidates then over all)

OverlapPolicy = Literal["refuse", "exclude"]


@dataclass(frozen=True)
class TargetSites:
    """Targets reduced to what the predictor sees: their usable sites as panel indices and their alleles
    in the panel's REF/ALT coding; ``exclude``: reference rows (``Panel.reference_haplotypes`` order) no
    target may copy (the haplotypes of target samples that are panel samples, ``panel_overlap``)."""

    samples: list[str]
    panel_index: np.ndarray  # int64 [n_used], strictly increasing
    haplotypes: np.ndarray  # uint8 [2 * n_samples, n_used]; haplotype 2*s is sample s's first allele
    counts: dict[str, int]
    exclude: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

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
        """Content id of the typed sites, the alleles on them and the excluded donors: the key of the targets'
        donor tables, so a table is never read for other targets, or for the same file matched under another
        policy."""
        h = hashlib.sha256()
        parts = [self.panel_index.astype(np.int64), np.int64(self.haplotypes.shape), self.haplotypes]
        if self.exclude.size:  # the key of targets without excluded donors is what it always was
            parts += [np.int64(self.exclude.size), self.exclude.astype(np.int64)]
        for a in parts:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class PanelOverlap:
    """Target samples that are panel samples: by sample ID, or by genotypes at the typed sites."""

    pairs: list[tuple[str, str, str]]  # (target sample, panel sample, how it was found)
    panel_samples: np.ndarray  # int64: the panel sample index of each pair

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def describe(self, limit: int = 3) -> str:
        shown = ", ".join(f"{t} = panel sample {p} ({how})" for t, p, how in self.pairs[:limit])
        return shown + (f" and {len(self.pairs) - limit} more" if len(self.pairs) > limit else "")

    def to_json(self) -> bytes:
        return json.dumps({"pairs": self.pairs, "panel_samples": self.panel_samples.tolist()}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PanelOverlap:
        d = json.loads(data)
        return cls([tuple(p) for p in d["pairs"]], np.array(d["panel_samples"], np.int64))


def panel_overlap(panel: Panel, targets: TargetSites) -> PanelOverlap:
    """The target samples that are panel samples: the same sample ID, or genotypes that differ at no more
    than ``OVERLAP_MAX_DISCORDANCE`` of the typed sites where either carries ALT (at least
    ``OVERLAP_MIN_SITES`` of them)."""
    names = {str(n): i for i, n in enumerate(panel.samples)}
    found: dict[int, tuple[int, str]] = {}  # target sample -> (panel sample, how)
    for t, name in enumerate(targets.samples):
        if name in names:
            found[t] = (names[name], "same sample ID")
    n_typed = targets.panel_index.size
    if n_typed >= OVERLAP_MIN_SITES:
        target_gt = (targets.haplotypes[0::2] + targets.haplotypes[1::2]).astype(np.int8)  # [T, M]
        haps = panel.haplotypes_at(targets.panel_index)
        panel_gt = (haps[0::2] + haps[1::2]).astype(np.int8)  # [N, M]
        screen = np.unique(np.linspace(0, n_typed - 1, min(n_typed, _OVERLAP_SCREEN_SITES)).round().astype(np.int64))
        for lo in range(0, target_gt.shape[0], 16):
            a, b = target_gt[lo : lo + 16, None, screen], panel_gt[None, :, screen]
            informative = ((a > 0) | (b > 0)).sum(axis=2)
            screened = (a != b).sum(axis=2) / np.maximum(informative, 1)  # [t, N]
            for dt, p in zip(*np.nonzero(screened <= 5 * OVERLAP_MAX_DISCORDANCE)):
                t, x, y = lo + int(dt), target_gt[lo + int(dt)], panel_gt[p]
                informative_all = int(((x > 0) | (y > 0)).sum())
                discordance = float((x != y).sum()) / max(informative_all, 1)
                if informative_all >= OVERLAP_MIN_SITES and discordance <= OVERLAP_MAX_DISCORDANCE and t not in found:
                    share = f"{100 * (1 - discordance):.1f} %"
                    found[t] = (int(p), f"genotypes agree at {share} of {informative_all:,} informative typed sites")
    order = sorted(found)
    return PanelOverlap(
        [(targets.samples[t], str(panel.samples[found[t][0]]), found[t][1]) for t in order],
        np.array([found[t][0] for t in order], np.int64),
    )


def checked_against_panel(
    panel: Panel, targets: TargetSites, overlap: PanelOverlap, policy: OverlapPolicy, what: str
) -> TargetSites:
    """``targets`` when none of its samples is a panel sample (``overlap``: ``panel_overlap``'s finding);
    else refused (``policy`` refuse: their own haplotypes would be donors, inflating every figure on them),
    or returned with the overlapping samples' haplotypes excluded from every target's reference (exclude)."""
    if not overlap:
        return targets
    if policy == "refuse":
        raise InputError(
            f"{what}: {len(overlap.pairs)} target sample(s) are in the panel {panel.path} ({overlap.describe()}), so "
            "their own haplotypes would be their donors and every figure on them inflated: remove them from the "
            "targets, or pass --exclude-panel-overlap (data.panel_overlap: exclude) to impute them against the panel "
            "without those samples"
        )
    row = np.full(panel.n_haplotypes, -1, np.int64)
    reference = panel.reference_haplotypes()
    row[reference] = np.arange(reference.size)
    haps = np.stack([2 * overlap.panel_samples, 2 * overlap.panel_samples + 1], axis=1).reshape(-1)
    exclude = np.unique(row[haps][row[haps] >= 0])  # validation-split samples are no donors anyway
    log.warning(
        "%s: %d target sample(s) are in the panel (%s): their %d reference haplotype(s) are left out of every target's donors",
        what,
        len(overlap.pairs),
        overlap.describe(),
        exclude.size,
    )
    return replace(targets, exclude=exclude)


def _read_targets(targets_vcf: Path, skip_non_snps: bool) -> PhasedVcf:
    try:
        return read_phased_vcf(targets_vcf, skip_non_snps=skip_non_snps)
    # The reader's fixes are worded for a panel; for targets the step that fixes both unphased and missing
    # calls is phasing against the panel.
    except UnphasedGenotype as exc:
        raise VcfError(f"{targets_vcf}: targets must be phased ({exc.where}); {FIX_PHASE_TARGETS}") from None
    except MissingGenotype as exc:
        raise VcfError(
            f"{targets_vcf}: targets must have no missing calls ({exc.where}); phasing fills them: {FIX_PHASE_TARGETS}"
        ) from None


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
