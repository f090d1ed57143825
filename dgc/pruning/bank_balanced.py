"""Bank-balanced pruning: every bank of a row keeps the same number of weights.

Each row of the ``(out, fan_in)`` weight view is split into equal banks of ``bank_size``
consecutive entries; every bank prunes its own ``round(s * bank_size)`` smallest ``|w|``
(Cao et al., FPGA'19 "Efficient and effective sparse LSTM on FPGA with bank-balanced
sparsity"; Yao et al., AAAI'19). Every bank, hence every row, holds the same count, so
parallel lanes that each own one bank finish together.

When the row length is not a multiple of ``bank_size``, the layer uses the largest divisor of
its row length not above ``bank_size`` (logged once), so banks stay equal within a layer;
``strict=True`` turns that into a ``ValueError`` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor

from dgc.pruning.granularity import (
    LayerwiseGranularity,
    as_matrix,
    count_to_prune,
    element_scores,
    prune_lowest_per_row,
)

__all__ = ["BankBalanced", "effective_bank_size"]

log = logging.getLogger(__name__)


def effective_bank_size(row_length: int, bank_size: int) -> int:
    """Largest divisor of ``row_length`` that is at most ``bank_size``."""
    for b in range(min(bank_size, row_length), 0, -1):
        if row_length % b == 0:
            return b
    return 1


@dataclass(kw_only=True, slots=True)
class BankBalanced(LayerwiseGranularity):
    """Prune the same number of entries in every bank of ``bank_size`` entries of a row."""

    bank_size: int = 16
    """Entries per bank along the fan-in of a row (the ``(out, fan_in)`` view)."""
    strict: bool = False
    """True: a row length that ``bank_size`` does not divide is a ``ValueError``; False: such a
    layer uses the largest divisor of its row length below ``bank_size``."""

    def __post_init__(self) -> None:
        if not isinstance(self.bank_size, int) or self.bank_size < 2:
            raise ValueError(
                f"prune.granularity.bank_size must be an int >= 2, got {self.bank_size!r}"
            )

    def bank_size_for(self, weight: Tensor) -> int:
        """The bank size used for ``weight`` (see the module docstring)."""
        row = as_matrix(weight).shape[1]
        return effective_bank_size(row, self.bank_size)

    def check(self, name: str, weight: Tensor) -> None:
        row = as_matrix(weight).shape[1]
        bank = self.bank_size_for(weight)
        if bank != self.bank_size:
            if self.strict:
                raise ValueError(
                    f"prune.granularity.bank_size={self.bank_size} does not divide the row "
                    f"length {row} of {name}; choose a divisor of {row}, exclude the layer "
                    "(prune.exclude), or set prune.granularity.strict=false"
                )
            log.info("bank-balanced pruning of %s uses banks of %d (row length %d)", name, bank,
                     row)

    def layer_mask(self, weight: Tensor, sparsity: float, prev_mask: Tensor | None) -> Tensor:
        bank = self.bank_size_for(weight)
        scores = as_matrix(element_scores(weight, prev_mask)).reshape(-1, bank)
        keep = prune_lowest_per_row(scores, count_to_prune(sparsity, bank))
        return keep.reshape(weight.shape)
