"""Inner update rules that run on the low-rank tensor R (DESIGN.md sections 4 and 8), by name.

* ``adam`` (:mod:`.adam`): Adam with bias correction, fp32 or blockwise INT8 moments;
* ``adafactor`` (:mod:`.adafactor`): factored second moment, update clipping, optional first moment;
* ``orthogonal`` (:mod:`.orthogonal`): one momentum, orthogonalized by an exact SVD or Newton–Schulz.

A rule is a :class:`Rule` subclass joined with :func:`register`; ``rule="<name>"`` selects it on any
preset and projector. :mod:`.base` says what a rule declares and what has a default.

>>> import lowrank_optim as lro
>>> @lro.rules.register
... class SignMomentum(lro.rules.Rule):
...     name, keys = "sign_momentum", ("exp_avg",)
...     def direction(self, low, state, group):
...         state["exp_avg"].lerp_(low, 1 - group["betas"][0])
...         return state["exp_avg"].sign()
"""

from .base import REGISTRY, Rule, available, get, register  # noqa: I001 (adam registers first)
from .adam import Adam, adam_direction, adamw_plain
from . import adafactor, orthogonal
from .adafactor import Adafactor
from .orthogonal import Orthogonal

#: The built-in rules' names (``available()`` lists every registered one).
RULES = ("adam", "adafactor", "orthogonal")

__all__ = ["REGISTRY", "RULES", "Adafactor", "Adam", "Orthogonal", "Rule", "adafactor", "adam_direction",
           "adamw_plain", "available", "get", "orthogonal", "register"]
