"""Inner update rules that run on the low-rank tensor (``adam`` so far)."""

from .adam import adam_direction, adamw_plain

__all__ = ["adam_direction", "adamw_plain"]
