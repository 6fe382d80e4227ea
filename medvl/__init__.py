"""medvl: fused GPU kernels for medical vision-language alignment, and the layer that uses them."""

__version__ = "0.1.0"

from medvl import nn  # noqa: E402
from medvl._info import info  # noqa: E402
from medvl.ops import BackendUnavailable, sigmoid_loss  # noqa: E402

__all__ = ["BackendUnavailable", "info", "nn", "sigmoid_loss", "__version__"]
