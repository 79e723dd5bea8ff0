"""The bank of rANS frequency tables that every chunk's components choose from.

Storing a histogram per (layer, K/V, component) in every chunk would cost as much as the data, so the
codec ships a fixed bank of parametric tables (generalised-Gaussian shapes x geometric scales over the
rANS alphabet) and each chunk stores one byte per component: the index of the table that codes it
cheapest. The bank is data, shipped with the package (``tables_v1.npy``) so that encoders and decoders
on any machine use identical integers; ``build_table_bank`` regenerates it and a test checks the two
agree. Table 0 is reserved for dead components (all zero, not coded).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvwire.kernels import rans

TABLE_BANK_VERSION = 1
BANK_FILE = Path(__file__).with_name("tables_v1.npy")
SHAPES = (0.6, 1.0, 1.6)
SCALES = tuple(float(0.12 * 1.5**i) for i in range(26))  # 0.12 .. ~3e3 quantisation steps


@dataclass(frozen=True)
class TableBank:
    """Frequencies, cumulative frequencies and the slot->symbol lookup of every table."""

    freq: np.ndarray  # uint32 [n_tables, NUM_SYMBOLS]; row 0 is the unused dead-component table
    cum: np.ndarray  # uint32 [n_tables, NUM_SYMBOLS]
    lut: np.ndarray  # uint8 [n_tables, PROB_SCALE]
    code_length: np.ndarray  # float64 [n_tables, NUM_SYMBOLS], bits per symbol incl. raw bits
    digest: str

    @property
    def n_tables(self) -> int:
        return int(self.freq.shape[0])


def _symbol_masses(shape: float, scale: float) -> np.ndarray:
    """Probability of each alphabet symbol under a discretised generalised Gaussian."""
    extra = rans.symbol_extra_bits()
    mags = np.arange(0, rans.MAX_ABS_VALUE + 1, dtype=np.float64)
    density = np.exp(-((mags / scale) ** shape))
    masses = np.zeros(rans.NUM_SYMBOLS)
    for sym in range(rans.NUM_SYMBOLS):
        if extra[sym] == 0:
            masses[sym] = density[abs(sym - rans.DIRECT_MAX)]
        else:
            k = int(extra[sym])
            masses[sym] = density[1 << k : 1 << (k + 1)].sum()
    return masses / masses.sum()


def _quantise(p: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to PROB_SCALE, each at least 1, close to ``p``."""
    n = p.shape[0]
    free = rans.PROB_SCALE - n
    f = 1 + np.floor(p * free).astype(np.int64)
    short = rans.PROB_SCALE - int(f.sum())
    # Hand the remainder to the symbols with the largest fractional parts (ties: lower index).
    order = np.lexsort((np.arange(n), -(p * free - np.floor(p * free))))
    f[order[:short]] += 1
    return f


def build_table_bank() -> np.ndarray:
    """Regenerate the bank's frequency array (uint16 [n_tables, NUM_SYMBOLS])."""
    rows = [np.zeros(rans.NUM_SYMBOLS, dtype=np.int64)]
    rows[0][rans.DIRECT_MAX] = rans.PROB_SCALE  # placeholder row for dead components
    for shape in SHAPES:
        for scale in SCALES:
            rows.append(_quantise(_symbol_masses(shape, scale)))
    return np.stack(rows).astype(np.uint16)


@functools.cache
def table_bank() -> TableBank:
    """The shipped bank, with the derived arrays the coder needs."""
    freq16 = np.load(BANK_FILE, allow_pickle=False)
    freq = freq16.astype(np.uint32)
    if freq.ndim != 2 or freq.shape[1] != rans.NUM_SYMBOLS or np.any(freq.sum(1) != rans.PROB_SCALE):
        raise RuntimeError(f"corrupt rANS table bank {BANK_FILE}")
    cum = np.zeros_like(freq)
    cum[:, 1:] = np.cumsum(freq, axis=1)[:, :-1]
    lut = np.zeros((freq.shape[0], rans.PROB_SCALE), dtype=np.uint8)
    for i in range(freq.shape[0]):
        lut[i] = np.repeat(np.arange(rans.NUM_SYMBOLS, dtype=np.uint8), freq[i])
    with np.errstate(divide="ignore"):
        code_length = -np.log2(freq / rans.PROB_SCALE) + rans.symbol_extra_bits()[None, :]
    code_length[0] = np.inf
    digest = hashlib.sha256(freq16.tobytes()).hexdigest()
    return TableBank(freq=freq, cum=cum, lut=lut, code_length=code_length, digest=digest)


def choose_tables(histograms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pick the cheapest table for each component from its symbol histogram.

    ``histograms`` is [n_components, NUM_SYMBOLS]; components whose only symbol is zero get table 0
    (dead). Returns (table index uint8 [n_components], coded bits float64 [n_components]).
    """
    bank = table_bank()
    cost = histograms @ bank.code_length[1:].T  # [n, n_tables - 1]
    best = np.argmin(cost, axis=1)
    bits = cost[np.arange(cost.shape[0]), best]
    index = (best + 1).astype(np.uint8)
    dead = histograms.sum(1) == histograms[:, rans.DIRECT_MAX]
    index[dead] = 0
    bits[dead] = 0.0
    return index, bits


if __name__ == "__main__":  # python -m kvwire.kernels.tables: regenerate the shipped bank
    np.save(BANK_FILE, build_table_bank(), allow_pickle=False)
    print(f"wrote {BANK_FILE}")
