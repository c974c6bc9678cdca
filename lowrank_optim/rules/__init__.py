"""Inner update rules that run on the low-rank tensor R (DESIGN.md section 4).

* ``adam`` (:mod:`.adam`): Adam with bias correction, fp32 or blockwise INT8 moments;
* ``adafactor`` (:mod:`.adafactor`): factored second moment, update clipping, optional first moment;
* ``orthogonal`` (:mod:`.orthogonal`): one momentum, orthogonalized by an exact SVD or Newton–Schulz.

Each rule keeps its own state keys; the optimizer (``lro.LowRankAdamW``) chooses the rule per group.
"""

from . import adafactor, orthogonal
from .adam import adam_direction, adamw_plain

RULES = ("adam", "adafactor", "orthogonal")

__all__ = ["RULES", "adafactor", "adam_direction", "adamw_plain", "orthogonal"]
