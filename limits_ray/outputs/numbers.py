"""Numbers printed for people: fixed significant digits, no negative zeros, no ``± nan``.

Used by the console tables of the CLI, ``compare.md`` and ``report.md``. A value within
``ZERO`` of 0 (float rounding, e.g. best-of-1's KL ``log 1 - 0 = -1.7e-16``) prints as ``0``; a
missing standard error (NaN) is left out, and the caller adds a footnote saying why.
"""

from __future__ import annotations

import math

__all__ = ["MISSING", "ZERO", "format_estimate", "format_number"]

ZERO = 1e-12
MISSING = "—"


def format_number(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits (``g`` style); ``0`` for |value| < :data:`ZERO`,
    :data:`MISSING` for None or NaN, ``inf``/``-inf`` as such."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if abs(value) < ZERO:
        return "0"
    text = f"{value:.{digits}g}"
    return "0" if float(text) == 0 else text


def format_estimate(value: float, se: float | None, digits: int = 3, se_digits: int = 2, mark: str = "") -> str:
    """``"value ± se"``; with no standard error (None or NaN) just ``value`` followed by ``mark``
    (a footnote marker explaining why), never ``± nan``."""
    if se is None or math.isnan(se):
        return format_number(value, digits) + mark
    return f"{format_number(value, digits)} ± {format_number(abs(se), se_digits)}"
