"""The donor table's layout, in memory and on disk: the run's largest cache artifact at ~0.2 bytes per entry.

The HMM hands over donors [G, Q, k] (uint16/int32, heaviest first) and float16 weights: 4 bytes per
(gap, query, donor), 650 GB for a 1000 Genomes-scale genome's training and validation tables (2 M typed
sites x 1,269 queries x k = 64). Stored as below it is 21-23x smaller (0.172 and 0.186 bytes per entry on
the kgp-like bench's target and training tables), because along a query's gaps the table barely changes:

- **slots.** 93 % of a gap's k donors are among the previous gap's (the HMM's posterior moves only at
  mismatches and recombination), so each donor keeps its slot from gap to gap and a new one takes a freed
  slot (``slot_order``). XORed with the previous gap's slots, the donors are zero wherever nothing changed.
- **weights as log codes.** A uint8 per weight on a log scale from 1 down to ``FLOOR`` (254 steps of
  4.5 %, so a weight is kept to +-2.3 %; ``BELOW`` means under the floor, read as 0). Donors that match the
  query at the same sites keep their ratio, so a code rarely moves and its difference from the previous
  gap's is mostly zero. Under 1e-5 a weight is noise to every reader: the model clamps log weights at 1e-6,
  and the mass under 1e-5 is ~4e-5 per gap, less than float16's rounding of the weights' sum. Half the
  slots are under it, so they keep their last donor rather than store the HMM's churn among references it
  gives no weight (a third of the stored bytes).
- **zstd** (level 9) over both streams, query-major (a query's gaps in a row). Before the floor's holding,
  on the target table: zstd 0.285 bytes per entry, compressed at 56 MB/s of table and read at ~0.8 GB/s;
  bz2 0.266 and 20x slower to read; zlib 0.34; lzma 0.26 and 40x slower to write.

In memory a table stays in slot order with its codes (3 bytes per entry, not 4); what a batch reads is
put heaviest first and turned into weights summing to 1 then (``heaviest_first``, ``code_weights``: a
[B, G, k] slice). The quantization is the only loss, and it happens before anyone reads a table
(``rag_hpc.index.donors.DonorTable.of``), so the job that computed a part and every later reader see the
same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import zstandard

FORMAT = 3  # 3: slot order, XOR/difference along gaps, log8 weights, zstd (2: heaviest-first npz arrays)
ZSTD_LEVEL = 9
FLOOR = 1e-5
STEPS = 254  # codes 0..254 span weights 1..FLOOR; 255: below FLOOR
STEP = math.log(1.0 / FLOOR) / STEPS
BELOW = np.uint8(255)


def donor_dtype(n_reference: int) -> type[np.integer]:
    """The donor column's type: uint16 up to 65,536 reference haplotypes, else int32."""
    return np.uint16 if n_reference <= np.iinfo(np.uint16).max + 1 else np.int32


def slot_order(donors: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Donors and their weight codes [G, Q, k] with each donor kept in its slot from one gap to the next:
    a donor also among the previous gap's stays where it was there, a new one takes the first slot freed
    (heaviest new donor, first freed slot). A slot under the floor (``BELOW``) then holds the donor it held
    at the gap before: which reference fills a weightless slot is noise that would otherwise be stored
    (half the slots, a third of the stored bytes), and no reader can tell (weight 0). Slots are matched
    on the HMM's donors, never on held ones, so a gap's weighted donors stay distinct."""
    g_n, q_n, k = donors.shape
    out_d, out_w = np.empty_like(donors), np.empty_like(codes)
    out_d[0], out_w[0] = donors[0], codes[0]
    real_prev = donors[0]
    # Flat indices throughout: numpy's 2-D fancy indexing costs ~3x more, and this loop runs per gap.
    # place[q * n + donor]: 1 + the donor's column in the current gap, 0 if absent (O(Q k) per gap).
    n = int(donors.max()) + 1
    place = np.zeros(q_n * n, np.int16)
    query_base = (np.arange(q_n) * n)[:, None]
    row_base = (np.arange(q_n) * (k + 1))[:, None]  # rows of k + 1 columns: the last takes what goes nowhere
    columns = np.broadcast_to(np.arange(1, k + 1, dtype=np.int16), (q_n, k)).ravel()
    slot_ids = np.broadcast_to(np.arange(k), (q_n, k))
    for g in range(1, g_n):
        prev, cur, cur_w = real_prev, donors[g], codes[g]
        cur_at = (query_base + cur).ravel()
        place[cur_at] = columns
        at = place[(query_base + prev).ravel()].reshape(q_n, k).astype(np.int64) - 1  # prev slot -> current column
        place[cur_at] = 0
        kept = at >= 0
        new = np.ones(q_n * (k + 1), bool)
        new[(row_base + np.where(kept, at, k)).ravel()] = False
        new = new.reshape(q_n, k + 1)[:, :k]
        # The r-th new donor (heaviest first) goes to the r-th freed slot: ranks by cumsum, no sort.
        free_of_rank = np.full(q_n * (k + 1), k)
        free_of_rank[(row_base + np.where(kept, k, np.cumsum(~kept, 1) - 1)).ravel()] = slot_ids.ravel()
        rank = np.where(new, np.cumsum(new, 1) - 1, k)
        to = (row_base + np.where(new, free_of_rank[(row_base + rank).ravel()].reshape(q_n, k), k)).ravel()
        slots = np.zeros(q_n * (k + 1), donors.dtype)
        slot_w = np.zeros(q_n * (k + 1), codes.dtype)
        slots.reshape(q_n, k + 1)[:, :k] = np.where(kept, prev, 0)
        slot_w.reshape(q_n, k + 1)[:, :k] = np.where(
            kept, cur_w.ravel()[(np.arange(q_n)[:, None] * k + np.maximum(at, 0)).ravel()].reshape(q_n, k), 0
        )
        slots[to] = cur.ravel()
        slot_w[to] = cur_w.ravel()
        real_prev = slots.reshape(q_n, k + 1)[:, :k]
        out_w[g] = slot_w.reshape(q_n, k + 1)[:, :k]
        out_d[g] = np.where(out_w[g] == BELOW, out_d[g - 1], real_prev)
    return out_d, out_w


def _code_of_float16() -> np.ndarray:
    w = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore"):  # NaN and negative bit patterns: below the floor
        codes = np.minimum(np.round(-np.log(np.maximum(w, FLOOR)) / STEP), STEPS)
        return np.where(w >= FLOOR, codes, BELOW).astype(np.uint8)


_CODE_OF_FLOAT16 = _code_of_float16()


def weight_codes(weights: np.ndarray) -> np.ndarray:
    """uint8 log codes of weights in [0, 1]: 0 is 1, each step 4.5 % lighter, ``BELOW`` under ``FLOOR``;
    one lookup per weight by its float16 bits (float16's rounding is 1 % of a step)."""
    return _CODE_OF_FLOAT16[np.asarray(weights, np.float16).view(np.uint16)]


_WEIGHT_OF_CODE = np.where(np.arange(256) == BELOW, 0.0, np.exp(-STEP * np.arange(256))).astype(np.float32)


def code_weights(codes: np.ndarray) -> np.ndarray:
    """float32 weights of ``codes`` [..., k], scaled to sum to 1 over the last axis."""
    w = _WEIGHT_OF_CODE[codes]
    return w / w.sum(-1, keepdims=True)


def heaviest_first(codes: np.ndarray) -> np.ndarray:
    """The order [..., k] that puts each row's donors heaviest first (ties in slot order)."""
    return np.argsort(codes, axis=-1, kind="stable")


def pack(donors: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    """The stored form of a table in slot order (donors and codes [G, Q, k]): arrays for an npz."""
    d = np.ascontiguousarray(donors.transpose(1, 0, 2))
    c = np.ascontiguousarray(codes.transpose(1, 0, 2))
    d[:, 1:] ^= d[:, :-1].copy()
    c[:, 1:] -= c[:, :-1].copy()  # uint8: differences wrap around, and so does their sum on reading
    zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return {
        "shape": np.array(donors.shape, np.int64),
        "donor_dtype": np.array(donors.dtype.str),
        "donors_zst": np.frombuffer(zstd.compress(d), np.uint8),  # the arrays' own buffers, not a bytes copy
        "codes_zst": np.frombuffer(zstd.compress(c), np.uint8),
    }


def unpack(stored: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(donors, codes) [G, Q, k] in slot order from ``pack``'s arrays."""
    g_n, q_n, k = (int(x) for x in stored["shape"])
    zstd = zstandard.ZstdDecompressor()
    d = np.frombuffer(zstd.decompress(stored["donors_zst"]), np.dtype(str(stored["donor_dtype"])))
    c = np.frombuffer(zstd.decompress(stored["codes_zst"]), np.uint8)
    d = np.bitwise_xor.accumulate(d.reshape(q_n, g_n, k), axis=1)
    c = np.cumsum(c.reshape(q_n, g_n, k), axis=1, dtype=np.uint8)
    return np.ascontiguousarray(d.transpose(1, 0, 2)), np.ascontiguousarray(c.transpose(1, 0, 2))
