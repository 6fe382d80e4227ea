"""Functional forms of every op, for `import medvl.nn.functional as MF`."""

from medvl.ops.sigmoid_loss import sigmoid_loss

__all__ = ["sigmoid_loss"]
