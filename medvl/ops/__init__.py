"""The ops: validation, torch.library registration, autograd, backend choice."""

from medvl.ops._dispatch import BackendUnavailable
from medvl.ops.sigmoid_loss import sigmoid_loss

__all__ = ["BackendUnavailable", "sigmoid_loss"]
