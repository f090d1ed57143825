"""Bank-balanced pruning: every bank of a row keeps the same number of weights.

Each row of the ``(out, fan_in)`` weight view is split into equal banks of ``bank_size``
consecutive entries, and each bank prunes its own smallest ``|w|`` (Cao et al., FPGA'19
"Efficient and effective sparse LSTM on FPGA with bank-balanced sparsity"; Yao et al.,
AAAI'19). The banks of a row hold the same count, so parallel lanes that each own one bank
of the row finish together.

How many entries a bank prunes (``balance``):

- ``"row"`` (default): a bank of row r prunes ``c_r`` entries, with ``c_r`` either
  ``floor(t)`` or ``floor(t) + 1`` and ``sum_r c_r = round(s * rows * bank)``, so the layer
  reaches ``s`` to within half an entry per bank position: the layer total is the multiple
  of (banks per row) nearest ``s * numel``, a sparsity error of at most
  ``1 / (2 * rows * bank)``. The rows that prune one more per bank are those where that
  costs least (smallest sum over their banks of the next ``|w|``), ties by row index; rows
  that already pruned one more keep doing so, so AGP never revives a weight.
- ``"layer"``: every bank of the layer prunes ``round(s * bank)``, so the layer reaches only
  ``round(s * bank) / bank`` (90% with banks of 16 gives 87.5%); for hardware that needs the
  same count in every row too.

When the row length is not a multiple of ``bank_size``, the layer uses the largest divisor of
its row length not above ``bank_size`` (logged once), so banks stay equal within a layer;
``strict=True`` turns that into a ``ValueError`` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dgc.pruning.granularity import (
    LayerwiseGranularity,
    as_matrix,
    count_to_prune,
    element_scores,
    prune_lowest,
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
    balance: Literal["row", "layer"] = "row"
    """"row": the banks of a row prune the same count, rows differ by at most one per bank,
    and the layer reaches the target to within 1/(2*rows*bank); "layer": every bank of the
    layer prunes round(s*bank), so the layer reaches round(s*bank)/bank."""
    strict: bool = False
    """True: a row length that ``bank_size`` does not divide is a ``ValueError``; False: such a
    layer uses the largest divisor of its row length below ``bank_size``."""

    def __post_init__(self) -> None:
        if isinstance(self.bank_size, bool) or not isinstance(self.bank_size, int) \
                or self.bank_size < 2:
            raise ValueError(
                f"prune.granularity.bank_size must be an int >= 2, got {self.bank_size!r}"
            )
        if self.balance not in ("row", "layer"):
            raise ValueError(
                f"prune.granularity.balance must be 'row' or 'layer', got {self.balance!r}"
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
        rows = weight.shape[0]
        scores = as_matrix(element_scores(weight, prev_mask)).reshape(rows, -1, bank)
        if self.balance == "layer":
            keep = prune_lowest_per_row(scores.reshape(-1, bank), count_to_prune(sparsity, bank))
            return keep.reshape(weight.shape)
        # Step 1: the total count per bank position over all rows, round(s * rows * bank),
        # split as evenly as possible: every row prunes `base` per bank, `extra` rows one more.
        base, extra = divmod(count_to_prune(sparsity, rows * bank), rows)
        ordered = torch.sort(scores, dim=-1, stable=True)  # each bank ascending, ties by index
        counts = torch.full((rows,), base, dtype=torch.long, device=weight.device)
        if extra:
            # Step 2: the extra goes to the rows where it costs least: the sum over the row's
            # banks of the next |w| each would prune (already pruned entries score -1, so rows
            # that pruned one more before come first and nothing is revived).
            # float64: the sum of a few float32 values is exact, so every device picks the
            # same rows (rank 0's masks are broadcast anyway).
            cost = ordered.values[:, :, base].double().sum(dim=1)
            counts += (~prune_lowest(cost, extra)).long()
        # Step 3: prune the counts[r] smallest entries of every bank of row r.
        position = torch.arange(bank, device=weight.device)
        keep_sorted = (position >= counts.view(rows, 1, 1)).expand_as(scores)
        keep = torch.empty_like(scores, dtype=torch.bool).scatter_(-1, ordered.indices,
                                                                   keep_sorted)
        return keep.reshape(weight.shape)
