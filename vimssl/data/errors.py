"""The one exception type the data package raises for bad input."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset, split, column or image that cannot be used as configured.

    The message always names the thing that is wrong (the path, split, column or sample) and,
    where it helps, what exists instead and which argument to change.
    """
