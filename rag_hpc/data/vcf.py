"""Every VCF the project reads or writes goes through here (the one module that imports cyvcf2): strict
phased-biallelic-SNP reading (panels, targets), calls to score (``read_calls``: GT phased or not, and DS),
whether a file is phased and its chromosome, matching a target's sites to the panel's, and bgzip + tabix
writing (``VcfWriter``; ``ImputedVcfWriter`` formats GT:DS:GP records a block of sites at a time with numpy,
fixed-width fields, since an imputed VCF has every panel site for every sample).

Reading goes through cyvcf2 and refuses anything the model cannot use (unphased, missing, non-diploid calls,
indels, multi-allelic records, unsorted or duplicate positions, several contigs) with one ``VcfError`` line that
names the record and the fix: a panel that is silently "cleaned" here would change which sites exist and so the
meaning of every window, cache key and imputed VCF downstream. Genotype problems a caller words its own fix for
are their own classes (``MissingGenotype``, ``UnphasedGenotype``: targets are phased, not re-exported).
"""

from __future__ import annotations

# cyvcf2 and pysam (htslib) are imported where a file is read or written: modules that import this one for
# its errors, site matching or chromosome names do not load htslib.
import contextlib
import gzip
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rag_hpc.errors import InputError
from rag_hpc.fsutil import AtomicFile

# The 28-byte empty block every bgzip writer appends; its absence means the file was cut short.
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")

FIX_NON_SNPS = "keep biallelic SNPs with `bcftools view -m2 -M2 -v snps in.vcf.gz -Oz -o snps.vcf.gz`"
FIX_PHASE = "phase it first, e.g. with SHAPEIT5 or `java -jar beagle.jar gt=in.vcf.gz out=phased`"
FIX_SORT = "sort it with `bcftools sort in.vcf.gz -Oz -o sorted.vcf.gz`"

_BASES = frozenset("ACGT")


class VcfError(InputError):
    """A VCF this project cannot use; the message names the record (CHROM:POS, sample) and the fix."""


class GenotypeCallError(VcfError):
    """A genotype call a phased panel cannot have: ``where`` names it (CHROM:POS sample and the call), the
    message adds the fix for a panel. Readers of other files (targets) word their own fix from ``where``."""

    def __init__(self, where: str, fix: str):
        super().__init__(f"{where}; {fix}")
        self.where = where


class MissingGenotype(GenotypeCallError):
    pass


class UnphasedGenotype(GenotypeCallError):
    pass


_ALIASES_SEEN: set[frozenset[str]] = set()


def same_chromosome(a: str, b: str) -> bool:
    """Whether two contig names name one chromosome: equal, or equal but for a ``chr`` prefix (``chr21`` in
    GRCh38 files, ``21`` in b37 ones, both common in one user's data). The second is logged once per pair."""
    if a == b:
        return True
    if a.removeprefix("chr") != b.removeprefix("chr"):
        return False
    if frozenset((a, b)) not in _ALIASES_SEEN:
        _ALIASES_SEEN.add(frozenset((a, b)))
        logging.getLogger("rag_hpc.data").warning("contigs %s and %s are read as one chromosome", a, b)
    return True


@dataclass(frozen=True)
class SiteBlock:
    """Consecutive biallelic SNP records; ``gt`` is None when genotypes were not asked for."""

    chrom: str
    pos: np.ndarray  # int64 [n], 1-based
    ref: np.ndarray  # S1 [n]
    alt: np.ndarray  # S1 [n]
    gt: np.ndarray | None  # int8 [n, n_samples, 2]


@dataclass(frozen=True)
class PhasedVcf:
    """A whole phased VCF in memory (targets, truth): fine for arrays, not for a 150k-site panel."""

    path: Path
    contig: str
    samples: list[str]
    pos: np.ndarray
    ref: np.ndarray
    alt: np.ndarray
    gt: np.ndarray  # int8 [n_sites, n_samples, 2]
    n_skipped_non_snps: int = 0

    @property
    def n_sites(self) -> int:
        return int(self.pos.shape[0])

    def haplotypes(self) -> np.ndarray:
        """uint8 [2 * n_samples, n_sites]; haplotype 2*s is sample s's first allele (as ``Panel.haplotypes``)."""
        return np.ascontiguousarray(self.gt.reshape(self.gt.shape[0], -1).T).astype(np.uint8, copy=False)


# Files people pass as a VCF by mistake, by their first bytes: htslib refuses them with stderr lines of its own.
_OTHER_FORMATS = {
    b"\x89HDF\r\n\x1a\n": "an HDF5 file (a prepared panel? pass the VCF it was made from)",
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"PK\x03\x04": "a zip archive",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
}
FIX_FORMAT = (
    "expected a bgzipped VCF: compress a VCF with `bgzip in.vcf`, or convert with `bcftools view in.bcf -Oz -o in.vcf.gz`"
)


def check_container(path: str | os.PathLike[str]) -> None:
    """Refuse missing, empty, truncated and non-VCF files and duplicate sample IDs before htslib sees them:
    htslib's own reaction is a multi-line stderr dump or, for a cut-off bgzip file depending on where the cut
    falls, a silently shorter panel."""
    p = Path(path)
    if not p.exists():
        raise VcfError(f"{p} does not exist")
    if p.is_dir():
        raise VcfError(f"{p} is a directory, expected a VCF file")
    size = p.stat().st_size
    if size == 0:
        raise VcfError(f"{p} is empty (0 bytes): expected a bgzipped VCF")
    with open(p, "rb") as fh:
        head = fh.read(18)
        is_bgzf = head[:4] == b"\x1f\x8b\x08\x04" and head[12:14] == b"BC"
        if is_bgzf:
            fh.seek(max(0, size - len(BGZF_EOF)))
            if fh.read() != BGZF_EOF:
                raise VcfError(
                    f"{p} is truncated (the bgzip end-of-file block is missing): the copy or download was cut short; "
                    "fetch or write it again"
                )
    _check_header(p, head)


def _check_header(p: Path, head: bytes) -> None:
    """The first line must declare a VCF, and the #CHROM line's sample IDs must be unique."""
    gzipped = head[:2] == b"\x1f\x8b"
    kind = next((what for magic, what in _OTHER_FORMATS.items() if head.startswith(magic)), None)
    if kind is not None:
        raise VcfError(f"{p} is not a VCF: it is {kind}; {FIX_FORMAT}")
    try:
        with gzip.open(p, "rb") if gzipped else open(p, "rb") as fh:
            first = fh.readline(1 << 16)
            if first.startswith(b"BCF"):
                return  # binary BCF: htslib reads it
            if not first.startswith(b"##fileformat=VCF"):
                inside = "gzip-compressed, but " if gzipped else ""
                raise VcfError(f"{p} is not a VCF: {inside}its first line is not ##fileformat=VCFv4.x; {FIX_FORMAT}")
            for line in fh:
                if line.startswith(b"#CHROM"):
                    counts = Counter(line.rstrip(b"\r\n").split(b"\t")[9:])
                    repeated = [(name.decode(errors="replace"), n) for name, n in counts.items() if n > 1]
                    if repeated:
                        name, n = repeated[0]
                        more = f" (and {len(repeated) - 1} more repeated IDs)" if len(repeated) > 1 else ""
                        raise VcfError(
                            f"{p}: sample ID {name} appears {n} times in the #CHROM line{more}; sample IDs must be unique: "
                            "rename the repeated ones there (or drop the columns of a sample listed twice)"
                        )
                    return
                if not line.startswith(b"#"):
                    return
    except (OSError, EOFError, zlib.error):
        return  # corrupt compressed data: the record reader reports it with the record it failed at


def _open_cyvcf2(path: Path, threads: int):  # -> cyvcf2.VCF
    import cyvcf2

    try:
        return cyvcf2.VCF(str(path), lazy=True, threads=threads)
    except Exception:  # noqa: BLE001 - OSError, or a bare Exception for a header htslib rejects
        raise VcfError(
            f"{path} is not a VCF (htslib cannot parse its header): expected a bgzipped VCF with a #CHROM line"
        ) from None


def _is_snp(ref: str, alts: Sequence[str]) -> bool:
    return len(alts) == 1 and len(ref) == 1 and len(alts[0]) == 1 and ref.upper() in _BASES and alts[0].upper() in _BASES


def _describe_non_snp(ref: str, alts: Sequence[str]) -> str:
    if not alts:
        return f"has no ALT allele (REF {ref}, ALT .)"
    if len(alts) > 1:
        return f"is multi-allelic (REF {ref}, ALT {','.join(alts)})"
    return f"is not a SNP (REF {ref}, ALT {alts[0]})"


class VcfReader:
    """Stream a phased biallelic-SNP VCF in blocks of sites, validating every record on the way.

    Genotype problems are found per block with numpy, so the per-record Python cost is one cyvcf2 call.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        skip_non_snps: bool = False,
        genotypes: bool = True,
        block_size: int = 1024,
        threads: int = 1,
    ):
        self.path = Path(path)
        self.skip_non_snps = skip_non_snps
        self.genotypes = genotypes
        self.block_size = block_size
        check_container(self.path)
        self._vcf = _open_cyvcf2(self.path, threads)
        self.samples: list[str] = list(self._vcf.samples)
        if genotypes and not self.samples:
            self._vcf.close()
            raise VcfError(f"{self.path} has no samples (no columns after FORMAT): a panel needs phased haplotypes")
        self.contig: str | None = None
        self.n_records = 0
        self.n_sites = 0
        self.n_skipped_non_snps = 0

    def close(self) -> None:
        self._vcf.close()

    def record_count(self) -> int | None:
        """Records per the tabix/CSI index (for progress bars), None without an index."""
        if not any(Path(f"{self.path}{ext}").is_file() for ext in (".tbi", ".csi")):
            return None  # asking cyvcf2 anyway makes htslib print an error line
        try:
            return int(self._vcf.num_records)
        except Exception:  # noqa: BLE001 - cyvcf2 raises a bare Exception when the index has no record count: unknown, no bar
            return None

    def __enter__(self) -> VcfReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blocks(self) -> Iterator[SiteBlock]:
        """Yield validated blocks; raise VcfError at the first bad record, or if no SNP record exists at all."""
        n_samples = len(self.samples)
        size = self.block_size
        pos = np.empty(size, np.int64)
        ref = np.empty(size, "S1")
        alt = np.empty(size, "S1")
        raw = np.empty((size, n_samples, 3), np.int16) if self.genotypes else None
        n = 0
        prev_pos = 0
        prev_kept = 0
        it = iter(self._vcf)
        while True:
            try:
                rec = next(it)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - cyvcf2 raises bare Exception on corrupt data
                where = f"after {self.contig}:{prev_pos}" if self.contig else "at the first record"
                raise VcfError(f"{self.path}: cannot read the record {where} ({exc}); the file is corrupt or truncated") from None
            self.n_records += 1
            chrom, p = rec.CHROM, rec.POS
            if self.contig is None:
                self.contig = chrom
            elif chrom != self.contig:
                self._check_genotypes(n, pos, raw)
                raise VcfError(
                    f"{chrom}:{p}: a second contig after {self.contig}; the panel must hold one chromosome: "
                    f"split it with `bcftools view -r {self.contig} in.vcf.gz -Oz -o {self.contig}.vcf.gz`"
                )
            if p < prev_pos:
                self._check_genotypes(n, pos, raw)
                raise VcfError(f"{chrom}:{p} comes after {chrom}:{prev_pos}: positions are not sorted; {FIX_SORT}")
            prev_pos = p
            r, alts = rec.REF, rec.ALT
            if not _is_snp(r, alts):
                if self.skip_non_snps:
                    self.n_skipped_non_snps += 1
                    continue
                self._check_genotypes(n, pos, raw)
                raise VcfError(
                    f"{chrom}:{p} {_describe_non_snp(r, alts)}; only biallelic SNPs are supported: {FIX_NON_SNPS} "
                    "(or pass --skip-non-snps to skip such records)"
                )
            if p == prev_kept:
                self._check_genotypes(n, pos, raw)
                raise VcfError(
                    f"{chrom}:{p}: duplicate position (two SNP records); keep one record per position: "
                    "merge split multi-allelics with `bcftools norm -m+` then drop them, or `bcftools norm -d all`"
                )
            prev_kept = p
            if raw is not None:
                raw[n] = self._record_genotypes(rec, chrom, p)
            pos[n] = p
            ref[n] = r.upper()
            alt[n] = alts[0].upper()
            n += 1
            if n == size:
                yield self._block(n, pos, ref, alt, raw)
                n = 0
        if n:
            yield self._block(n, pos, ref, alt, raw)
        if self.n_sites == 0:
            if self.n_records == 0:
                raise VcfError(f"{self.path} holds no variant records (header only)")
            raise VcfError(f"{self.path} holds no biallelic SNP record ({self.n_skipped_non_snps} non-SNP records skipped)")

    def _record_genotypes(self, rec, chrom: str, p: int) -> np.ndarray:
        try:
            g = rec.genotype
        except Exception:  # noqa: BLE001 - cyvcf2 raises a bare Exception for a record without GT
            g = None
        if g is None:
            raise VcfError(f"{chrom}:{p}: no GT field in this record; every record needs phased GT calls")
        arr = g.array()
        if arr.shape[1] != 3:
            # cyvcf2 sizes the array by the record's largest ploidy: 2 columns = all haploid, >3 = polyploid.
            alleles = arr[:, :-1]
            missing = np.flatnonzero((alleles == -1).any(axis=1))
            if missing.size:
                raise self._missing(chrom, p, int(missing[0]))
            if arr.shape[1] == 2:
                raise self._ploidy_error(chrom, p, 0, "haploid")
            s = int(np.flatnonzero((alleles[:, 2:] >= 0).any(axis=1))[0])
            raise self._ploidy_error(chrom, p, s, f"{arr.shape[1] - 1}-ploid")
        return arr

    def _missing(self, chrom: str, p: int, s: int) -> MissingGenotype:
        return MissingGenotype(
            f"{chrom}:{p} sample {self.samples[s]}: missing genotype ('.')",
            "the panel must have no missing calls: impute them first (e.g. with beagle) or drop such sites with "
            "`bcftools view -g ^miss`",
        )

    def _ploidy_error(self, chrom: str, p: int, s: int, what: str) -> VcfError:
        return VcfError(
            f"{chrom}:{p} sample {self.samples[s]}: {what} genotype; every call must be diploid "
            "(use an autosome, or code haploid chrX/chrY calls as diploid homozygotes)"
        )

    def _check_genotypes(self, n: int, pos: np.ndarray, raw: np.ndarray | None) -> None:
        """Raise for the first bad genotype (record-major) among the n buffered records."""
        if raw is None or n == 0:
            return
        a = raw[:n]
        alleles = a[:, :, :2]
        # Fast path: min/max are single vectorised passes; the detailed search below only runs on failure.
        # (on the contiguous block: the phase column is 0/1 too, and strided reductions are ~50x slower).
        if a.min() >= 0 and a.max() <= 1 and a[:, :, 2].min() >= 1:
            return
        missing = (alleles == -1).any(axis=2)
        haploid = (alleles == -2).any(axis=2) & ~missing
        bad_index = (alleles > 1).any(axis=2)
        unphased = a[:, :, 2] == 0
        bad = missing | haploid | bad_index | unphased
        if not bad.any():
            return
        r, s = np.unravel_index(int(np.flatnonzero(bad.ravel())[0]), bad.shape)
        chrom, p = self.contig, int(pos[r])
        if missing[r, s]:
            raise self._missing(chrom, p, s)
        if haploid[r, s]:
            raise self._ploidy_error(chrom, p, s, "haploid")
        g = alleles[r, s]
        if bad_index[r, s]:
            raise VcfError(
                f"{chrom}:{p} sample {self.samples[s]}: allele index {int(g.max())} in GT but the record has one ALT; "
                "the file is malformed: re-export it"
            )
        raise UnphasedGenotype(
            f"{chrom}:{p} sample {self.samples[s]}: unphased genotype {g[0]}/{g[1]}", f"the VCF must be phased: {FIX_PHASE}"
        )

    def _block(self, n: int, pos: np.ndarray, ref: np.ndarray, alt: np.ndarray, raw: np.ndarray | None) -> SiteBlock:
        self._check_genotypes(n, pos, raw)
        self.n_sites += n
        gt = raw[:n, :, :2].astype(np.int8) if raw is not None else None
        return SiteBlock(self.contig or "", pos[:n].copy(), ref[:n].copy(), alt[:n].copy(), gt)


def read_phased_vcf(path: str | os.PathLike[str], *, skip_non_snps: bool = False) -> PhasedVcf:
    """Read a whole target/array (or truth) VCF: sites, REF/ALT and phased haplotypes, validated as a panel is."""
    with VcfReader(path, skip_non_snps=skip_non_snps) as reader:
        blocks = list(reader.blocks())
        return PhasedVcf(
            path=Path(path),
            contig=reader.contig or "",
            samples=reader.samples,
            pos=np.concatenate([b.pos for b in blocks]),
            ref=np.concatenate([b.ref for b in blocks]),
            alt=np.concatenate([b.alt for b in blocks]),
            gt=np.concatenate([b.gt for b in blocks]),  # type: ignore[misc]
            n_skipped_non_snps=reader.n_skipped_non_snps,
        )


def read_vcf_sites(
    path: str | os.PathLike[str], *, skip_non_snps: bool = False
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(contig, POS int64, REF S1, ALT S1) without parsing genotypes."""
    with VcfReader(path, skip_non_snps=skip_non_snps, genotypes=False, block_size=1 << 16) as reader:
        blocks = list(reader.blocks())
        return (
            reader.contig or "",
            np.concatenate([b.pos for b in blocks]),
            np.concatenate([b.ref for b in blocks]),
            np.concatenate([b.alt for b in blocks]),
        )


# -- matching a target's sites to the panel ------------------------------------------------------------------

_COMPLEMENT = np.zeros(256, np.uint8)
for _a, _b in (("A", "T"), ("T", "A"), ("C", "G"), ("G", "C")):
    _COMPLEMENT[ord(_a)] = ord(_b)


def is_phased(vcf: str | os.PathLike[str], records: int = 2000) -> bool:
    """Whether the first ``records`` records of ``vcf`` are phased (every genotype '|' or homozygous)."""
    from cyvcf2 import VCF

    check_container(vcf)  # a missing or broken file: one clear error, not cyvcf2's
    reader = VCF(str(vcf), lazy=True, threads=1)
    try:
        for i, rec in enumerate(reader):
            if i >= records:
                break
            het = rec.gt_types == 1
            if het.any() and not np.asarray(rec.gt_phases)[het].all():
                return False
        return True
    finally:
        reader.close()


def first_contig(vcf: Path) -> str:
    """The chromosome of the first record (what Beagle and a map must name)."""
    from cyvcf2 import VCF

    reader = VCF(str(vcf), lazy=True)
    try:
        first = next(iter(reader), None)
    finally:
        reader.close()
    if first is None:
        raise VcfError(f"{vcf} holds no records")
    return str(first.CHROM)


# -- calls to score: GT (phased or not) and dosages, what ``rag_hpc.evaluate`` reads

# cyvcf2 gt_types: 0 HOM_REF, 1 HET, 2 UNKNOWN, 3 HOM_ALT -> ALT allele count (NaN = missing).
_GT_TYPE_COUNT = np.array([0.0, 1.0, np.nan, 2.0], np.float32)


@dataclass(frozen=True)
class Calls:
    """Biallelic SNP records of one VCF: sorted positions, alleles, per-sample dosage and hard allele count."""

    path: Path
    contig: str
    samples: list[str]
    pos: np.ndarray  # int64 [n]
    ref: np.ndarray  # S1 [n]
    alt: np.ndarray  # S1 [n]
    dosage: np.ndarray  # float32 [n, S]: DS, else the GT allele count; NaN = missing
    count: np.ndarray  # float32 [n, S]: GT allele count 0/1/2; NaN = missing
    n_skipped: int  # multi-allelic / non-SNP records


def read_calls(path: str | os.PathLike[str], *, dosage_field: str | None = "DS") -> Calls:
    """Read GT (phased or not) and, when the header declares it, ``dosage_field`` from every biallelic SNP
    record. Raises VcfError on unreadable files, several contigs, or duplicate positions."""
    import cyvcf2

    p = Path(path)
    check_container(p)
    try:
        vcf = cyvcf2.VCF(str(p), lazy=True, threads=1)
    except OSError:
        raise VcfError(f"{p} is not a VCF (htslib cannot parse its header)") from None
    try:
        samples = list(vcf.samples)
        if not samples:
            raise VcfError(f"{p} has no samples (no columns after FORMAT)")
        use_ds = dosage_field is not None and vcf.contains(dosage_field)
        pos: list[int] = []
        ref: list[str] = []
        alt: list[str] = []
        dosage: list[np.ndarray] = []
        count: list[np.ndarray] = []
        contig: str | None = None
        skipped = 0
        for rec in vcf:
            if contig is None:
                contig = rec.CHROM
            elif contig != rec.CHROM:
                raise VcfError(
                    f"{p}: {rec.CHROM}:{rec.POS} is on a second contig after {contig}; evaluate one chromosome at a time"
                )
            alts = rec.ALT
            if len(alts) != 1 or len(rec.REF) != 1 or len(alts[0]) != 1:
                skipped += 1
                continue
            c = _GT_TYPE_COUNT[rec.gt_types]
            d = rec.format(dosage_field) if use_ds else None
            pos.append(rec.POS)
            ref.append(rec.REF)
            alt.append(alts[0])
            count.append(c)
            dosage.append(c if d is None else d[:, 0].astype(np.float32))
    except VcfError:
        raise
    except Exception as exc:  # noqa: BLE001 - cyvcf2 raises bare Exception on corrupt records
        raise VcfError(f"{p}: cannot read it ({exc}); the file is corrupt or truncated") from None
    finally:
        vcf.close()
    if not pos:
        raise VcfError(f"{p} holds no biallelic SNP record")
    positions = np.asarray(pos, np.int64)
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    if positions.size > 1 and (np.diff(positions) == 0).any():
        dup = int(positions[np.flatnonzero(np.diff(positions) == 0)[0]])
        raise VcfError(f"{p}: {contig}:{dup} has two biallelic SNP records; keep one per position (`bcftools norm -d all`)")
    dos = np.stack(dosage)[order]
    dos[dos < -1e30] = np.nan  # htslib's missing float reads as a huge negative in some cyvcf2 versions
    return Calls(
        path=p,
        contig=contig or "",
        samples=samples,
        pos=positions,
        ref=np.char.upper(np.asarray(ref, "S1")[order]),
        alt=np.char.upper(np.asarray(alt, "S1")[order]),
        dosage=dos,
        count=np.stack(count)[order],
        n_skipped=skipped,
    )


class SiteMatch(NamedTuple):
    """Per target site: ``index`` into the panel or -1 (unknown position, or alleles that fit no orientation);
    ``swapped``: the target's REF is the panel's ALT, so its alleles must be flipped 0<->1; ``flipped``: the
    target is on the other strand (complemented alleles); ``ambiguous``: an A/T or C/G site, where a swap and a
    strand flip look the same — read as same-strand, callers that distrust the strand should drop these."""

    index: np.ndarray
    swapped: np.ndarray
    flipped: np.ndarray
    ambiguous: np.ndarray

    @property
    def matched(self) -> np.ndarray:
        return self.index >= 0


def _allele_codes(alleles: Sequence[str] | np.ndarray) -> np.ndarray:
    """ASCII code of single-base alleles (upper case); 0 for anything else, which then matches nothing."""
    arr = np.asarray(alleles)
    if arr.dtype.kind in "UO":
        arr = np.char.encode(arr.astype(str), "ascii")
    arr = np.char.upper(arr.astype("S"))
    if arr.size == 0:
        return np.zeros(0, np.uint8)
    width = arr.dtype.itemsize
    codes = np.frombuffer(np.ascontiguousarray(arr).tobytes(), np.uint8).reshape(-1, width)
    single = np.char.str_len(arr).ravel() == 1
    first = codes[:, 0].copy()
    first[~single | (_COMPLEMENT[first] == 0)] = 0
    return first


def match_sites(
    panel_pos: np.ndarray,
    panel_ref: np.ndarray | Sequence[str],
    panel_alt: np.ndarray | Sequence[str],
    pos: np.ndarray | Sequence[int],
    ref: np.ndarray | Sequence[str],
    alt: np.ndarray | Sequence[str],
) -> SiteMatch:
    """Match each target site (pos, ref, alt) to the panel (strictly increasing ``panel_pos``).

    Orientations are tried in this order: same alleles, REF/ALT swapped, other strand, other strand and swapped;
    strand-ambiguous sites therefore resolve to the same-strand reading and are flagged.
    """
    panel_pos = np.asarray(panel_pos, np.int64)
    if panel_pos.size > 1 and not (np.diff(panel_pos) > 0).all():
        raise ValueError("match_sites: panel positions must be strictly increasing")
    pos = np.asarray(pos, np.int64)
    pr_all, pa_all = _allele_codes(panel_ref), _allele_codes(panel_alt)
    tr, ta = _allele_codes(ref), _allele_codes(alt)
    if not (len(pr_all) == len(pa_all) == len(panel_pos)) or not (len(tr) == len(ta) == len(pos)):
        raise ValueError("match_sites: positions and alleles must have the same length")
    idx = np.searchsorted(panel_pos, pos)
    hit = idx < panel_pos.size
    hit[hit] = panel_pos[idx[hit]] == pos[hit]
    safe = np.where(hit, idx, 0)
    if panel_pos.size == 0:
        pr = pa = np.zeros(pos.size, np.uint8)
    else:
        pr, pa = pr_all[safe], pa_all[safe]
    valid = hit & (pr != 0) & (pa != 0) & (tr != 0) & (ta != 0)
    ctr, cta = _COMPLEMENT[tr], _COMPLEMENT[ta]
    same = valid & (tr == pr) & (ta == pa)
    swap = valid & ~same & (tr == pa) & (ta == pr)
    flip = valid & ~same & ~swap & (ctr == pr) & (cta == pa)
    flip_swap = valid & ~same & ~swap & ~flip & (ctr == pa) & (cta == pr)
    matched = same | swap | flip | flip_swap
    return SiteMatch(
        index=np.where(matched, idx, -1).astype(np.int64),
        swapped=swap | flip_swap,
        flipped=flip | flip_swap,
        ambiguous=matched & (_COMPLEMENT[pr] == pa),
    )


# -- writing -------------------------------------------------------------------------------------------------


class VcfWriter:
    """Phased VCF, bgzipped and tabix-indexed, written under a temporary name and renamed on ``close()``
    so a reader never sees half a file. Genotype text is built with numpy per block, not per genotype."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        contig: str,
        samples: Sequence[str],
        contig_length: int | None = None,
        source: str = "rag_hpc",
        extra_header: Sequence[str] = (),
    ):
        import pysam

        self.path = Path(path)
        if not self.path.name.endswith(".vcf.gz"):
            raise ValueError(f"{self.path}: a bgzipped VCF must be named *.vcf.gz")
        self.contig = contig
        self.n_samples = len(samples)
        self.n_sites = 0
        # The header through htslib (pysam), which checks every line and refuses a repeated sample; it
        # brings ##fileformat and the PASS filter.
        header = pysam.VariantHeader()
        header.add_line(f"##source={source}")
        header.contigs.add(contig, length=contig_length)
        header.add_line('##FORMAT=<ID=GT,Number=1,Type=String,Description="Phased genotype">')
        for line in extra_header:
            header.add_line(line)
        header.add_samples(list(samples))
        self._out, self._index = AtomicFile(self.path), AtomicFile(Path(f"{self.path}.tbi"))
        self._fh = pysam.BGZFile(str(self._out.tmp), "wb")
        self._fh.write(str(header).encode())
        self._last_pos = 0
        self._closed = False

    def write_phased(self, pos: np.ndarray, ref: np.ndarray, alt: np.ndarray, gt: np.ndarray) -> None:
        """Append sites: gt int [n, n_samples, 2] of 0/1 alleles; positions must continue strictly increasing."""
        pos = np.asarray(pos, np.int64)
        n = pos.shape[0]
        if n == 0:
            return
        if gt.shape != (n, self.n_samples, 2):
            raise ValueError(f"gt shape {gt.shape} != ({n}, {self.n_samples}, 2)")
        if gt.min() < 0 or gt.max() > 1:
            raise ValueError("VcfWriter.write_phased: alleles must be 0 or 1 (biallelic, no missing calls)")
        if n > 1 and not (np.diff(pos) > 0).all():
            raise ValueError("VcfWriter: positions must be strictly increasing")
        # One row per site: "\t" a "|" b for each sample, then "\n"; fixed width, so one numpy array per block.
        row = np.empty((n, self.n_samples, 4), np.uint8)
        row[:, :, 0] = ord("\t")
        row[:, :, 1] = gt[:, :, 0] + ord("0")
        row[:, :, 2] = ord("|")
        row[:, :, 3] = gt[:, :, 1] + ord("0")
        body = np.empty((n, 4 * self.n_samples + 1), np.uint8)
        body[:, :-1] = row.reshape(n, -1)
        body[:, -1] = ord("\n")
        refs = np.asarray(ref).astype("S1")
        alts = np.asarray(alt).astype("S1")
        contig = self.contig.encode()
        parts = []
        for i in range(n):
            parts.append(b"%s\t%d\t.\t%s\t%s\t.\tPASS\t.\tGT" % (contig, pos[i], refs[i], alts[i]))
            parts.append(body[i].data)
        self.write_records(b"".join(parts), int(pos[0]), int(pos[-1]), n)

    def write_records(self, records: bytes, first_pos: int, last_pos: int, n_sites: int) -> None:
        """Append ``n_sites`` formatted record lines (positions ``first_pos`` .. ``last_pos``, increasing
        within), after what was written: records a subclass or an earlier job formatted."""
        if first_pos <= self._last_pos:
            raise ValueError(f"VcfWriter: position {first_pos} after {self._last_pos}: positions must be strictly increasing")
        self._fh.write(records)
        self._last_pos = last_pos
        self.n_sites += n_sites

    def close(self) -> Path:
        import pysam

        if self._closed:
            return self.path
        self._closed = True
        try:
            self._fh.close()
            pysam.tabix_index(str(self._out.tmp), preset="vcf", force=True, keep_original=True, index=str(self._index.tmp))
            # The VCF first: in between, an old index is older than the VCF, which htslib warns of; a new
            # index beside the old VCF would send readers to wrong offsets without a word.
            self._out.commit()
            self._index.commit()
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the partial output (the destination is left as it was)."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._fh.close()
        self._out.discard()
        self._index.discard()

    def __enter__(self) -> VcfWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- imputed records: GT:DS:GP per sample, formatted per block with numpy

# Milli-units: DS and GP are written with three decimals, fixed width, so a block of genotypes is one numpy array.
_SCALE = 1000
_SAMPLE_FIELD = b"\t0|0:0.000:0.000,0.000,0.000"
_FIELD_WIDTH = len(_SAMPLE_FIELD)  # 28


def _put_milli(buf: np.ndarray, col: int, milli: np.ndarray) -> None:
    """Write integer milli-units (0..9999) as 'd.ddd' into buf[..., col:col + 5]."""
    buf[..., col] = milli // 1000 + 48
    buf[..., col + 1] = ord(".")
    buf[..., col + 2] = (milli // 100) % 10 + 48
    buf[..., col + 3] = (milli // 10) % 10 + 48
    buf[..., col + 4] = milli % 10 + 48


class ImputedVcfWriter(VcfWriter):
    """``VcfWriter`` (temporary name, bgzip, tabix, atomic rename on close, nothing left on abort) with
    imputation records: INFO AF/DR2/TYPED/IMP and FORMAT GT:DS:GP, formatted per block with numpy."""

    HEADER = (
        '##INFO=<ID=AF,Number=A,Type=Float,Description="Estimated ALT allele frequency: mean DS / 2 over the target samples">',
        '##INFO=<ID=DR2,Number=A,Type=Float,Description="Estimated squared correlation between imputed and true dosage: '
        'variance of DS over 2*AF*(1-AF), 0 where AF is 0 or 1 (as Beagle DR2 / Minimac R2)">',
        '##INFO=<ID=TYPED,Number=0,Type=Flag,Description="Typed in the targets: GT is the input genotype">',
        '##INFO=<ID=IMP,Number=0,Type=Flag,Description="Imputed: not typed in the targets">',
        '##FORMAT=<ID=DS,Number=A,Type=Float,Description="Estimated ALT dose: P(ALT on haplotype 1) + P(ALT on haplotype 2)">',
        "##FORMAT=<ID=GP,Number=G,Type=Float,Description=\"Genotype probabilities of 0/0, 0/1, 1/1 from the two haplotypes' "
        'ALT probabilities">',
    )

    def __init__(
        self, path: str | os.PathLike[str], *, contig: str, samples: Sequence[str], source: str, extra_header: Sequence[str] = ()
    ):
        super().__init__(path, contig=contig, samples=samples, source=source, extra_header=[*self.HEADER, *extra_header])

    def write_imputed(self, pos: np.ndarray, ref: np.ndarray, alt: np.ndarray, prob: np.ndarray, typed: np.ndarray) -> None:
        """Append sites: prob float [2 * n_samples, n] = P(ALT) per haplotype (haplotype 2*s, 2*s + 1 are
        sample s's first and second), typed bool [n]."""
        if len(pos):
            self.write_records(imputed_records(self.contig, pos, ref, alt, prob, typed), int(pos[0]), int(pos[-1]), len(pos))


def imputed_records(contig: str, pos: np.ndarray, ref: np.ndarray, alt: np.ndarray, prob: np.ndarray, typed: np.ndarray) -> bytes:
    """The record lines of sites ``pos`` (increasing) for ``ImputedVcfWriter``: a function of the sites
    alone, so a range imputed by one job and merged by another gives the bytes one job writes."""
    pos = np.asarray(pos, np.int64)
    n = pos.shape[0]
    n_samples = prob.shape[0] // 2
    if prob.shape != (2 * n_samples, n):
        raise ValueError(f"prob shape {prob.shape} != (2 * samples, {n})")
    if n > 1 and not (np.diff(pos) > 0).all():
        raise ValueError("ImputedVcfWriter: positions must be strictly increasing")
    p = np.asarray(prob, np.float64)
    p1 = p[0::2].T  # [n, S]
    p2 = p[1::2].T
    ds = p1 + p2
    gp0 = (1.0 - p1) * (1.0 - p2)
    gp2 = p1 * p2
    # Round GP0 and GP2, derive GP1 so the three printed values sum to exactly 1.000.
    m0 = np.rint(gp0 * _SCALE).astype(np.int64)
    m2 = np.minimum(np.rint(gp2 * _SCALE).astype(np.int64), _SCALE - m0)
    m1 = _SCALE - m0 - m2
    mds = np.clip(np.rint(ds * _SCALE).astype(np.int64), 0, 2 * _SCALE)

    buf = np.empty((n, n_samples, _FIELD_WIDTH), np.uint8)
    buf[:] = np.frombuffer(_SAMPLE_FIELD, np.uint8)
    buf[..., 1] = (p1 > 0.5) + 48
    buf[..., 3] = (p2 > 0.5) + 48
    _put_milli(buf, 5, mds)
    _put_milli(buf, 11, m0)
    _put_milli(buf, 17, m1)
    _put_milli(buf, 23, m2)
    body = np.empty((n, n_samples * _FIELD_WIDTH + 1), np.uint8)
    body[:, :-1] = buf.reshape(n, -1)
    body[:, -1] = ord("\n")

    af = ds.mean(axis=1) / 2.0
    hwe = 2.0 * af * (1.0 - af)
    with np.errstate(invalid="ignore", divide="ignore"):
        dr2 = np.where(hwe > 1e-12, ds.var(axis=1) / hwe, 0.0)
    refs = np.asarray(ref).astype("S1")
    alts = np.asarray(alt).astype("S1")
    name = contig.encode()
    parts = []
    for i in range(n):
        flag = b"TYPED" if typed[i] else b"IMP"
        parts.append(
            b"%s\t%d\t.\t%s\t%s\t.\tPASS\tAF=%.5f;DR2=%.3f;%s\tGT:DS:GP" % (name, pos[i], refs[i], alts[i], af[i], dr2[i], flag)
        )
        parts.append(body[i].data)
    return b"".join(parts)
