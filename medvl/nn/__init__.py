"""nn.Modules over the functional ops. Modules are thin: they only call the functional form."""

from medvl.nn import functional
from medvl.nn.sigmoid_loss import SigLIPLoss

__all__ = ["functional", "SigLIPLoss"]
