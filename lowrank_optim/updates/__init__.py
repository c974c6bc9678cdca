"""What a low-rank step writes into the weight: residual policies and scaling, by name (DESIGN.md 8).

``residual=`` picks one of ``drop``, ``sign``, ``sgd``, ``fira`` (:mod:`.residual`), ``gwt`` (:mod:`.gwt`),
``error_feedback`` (:mod:`.error_feedback`);
``scaling=`` one of ``channel``, ``tensor`` (:mod:`.scaling`), in place of project_back(N). :mod:`.base` has the interface, the
shared norm-growth limiter and :func:`register` for updates defined outside the package.
"""

from .base import REGISTRY, Context, Limiter, Update, available, for_group, register
from .gwt import WaveletDetails
from .residual import SGD, Drop, Fira, Sign
from .scaling import Channel, TensorWise  # noqa: I001 (scaling before residual: fira uses its factors)
from .error_feedback import ErrorFeedback  # noqa: E402,I001 (registered after the others: listings keep their order)

__all__ = ["REGISTRY", "SGD", "Channel", "Context", "Drop", "ErrorFeedback", "Fira", "Limiter", "Sign", "TensorWise", "Update",
           "WaveletDetails", "available", "for_group", "register"]
