"""medvl: fused GPU kernels for medical vision-language alignment, and the layer that uses them."""

from medvl import nn  # noqa: E402
from medvl._info import info, version  # noqa: E402

__version__ = version()
from medvl.ops import BackendUnavailable, Triplets, patch_embed3d, sigmoid_loss, triplet_mining  # noqa: E402

__all__ = ["BackendUnavailable", "Triplets", "info", "nn", "patch_embed3d", "sigmoid_loss", "triplet_mining", "__version__"]
