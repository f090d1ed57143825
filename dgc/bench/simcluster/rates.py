"""Link rates and durations as the command line writes them (``1gbit``, ``0.2ms``)."""

from __future__ import annotations

import math
import re

__all__ = ["format_rate", "parse_rate", "parse_time"]

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER_UNIT = re.compile(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)")


def parse_rate(text: str) -> float | None:
    """Parse a link rate like ``"1gbit"``, ``"100mbit"`` or ``"2.5gbit"`` into bits per second.

    ``"unlimited"`` (also ``"none"``, ``"inf"``) returns ``None``: no rate limit. Units are
    decimal (1 gbit = 1e9 bit/s), as in ``tc``; ``tc``'s byte units (``bps``, ``mbps``) are
    refused because they are easy to misread as bits.
    """
    s = text.strip().lower()
    if s in ("unlimited", "none", "inf"):
        return None
    m = _NUMBER_UNIT.fullmatch(s)
    if m is None or m.group(2) not in _RATE_UNITS:
        raise ValueError(
            f"bandwidth {text!r} is not a rate: use a number with one of "
            f"{', '.join(_RATE_UNITS)} (e.g. '1gbit', '100mbit') or 'unlimited'"
        )
    bits = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not bits > 0 or not math.isfinite(bits):
        raise ValueError(f"bandwidth {text!r} must be > 0; use 'unlimited' for no limit")
    return bits


def parse_time(text: str) -> float:
    """Parse a duration like ``"0.2ms"``, ``"50us"`` or ``"1s"`` into seconds (``"0"`` is 0)."""
    s = text.strip().lower()
    if s in ("0", "0.0", "off", "none"):
        return 0.0
    m = _NUMBER_UNIT.fullmatch(s)
    if m is None or m.group(2) not in _TIME_UNITS:
        raise ValueError(
            f"delay {text!r} is not a duration: use a number with one of "
            f"{', '.join(_TIME_UNITS)} (e.g. '0.2ms', '50us') or '0'"
        )
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def format_rate(bits_per_s: float | None) -> str:
    """``1.5e9 -> '1.50 Gbit/s'``; ``None -> 'unlimited'``."""
    if bits_per_s is None:
        return "unlimited"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.2f} {unit}"
    return f"{bits_per_s:.0f} bit/s"
