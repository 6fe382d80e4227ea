"""Functional forms of every op, for `import medvl.nn.functional as MF`."""

from medvl.nn.supcon_loss import supcon_loss
from medvl.nn.triplet_loss import triplet_margin_loss
from medvl.ops.patch_embed3d import patch_embed3d
from medvl.ops.sigmoid_loss import sigmoid_loss
from medvl.ops.triplet_mining import triplet_mining

__all__ = ["patch_embed3d", "sigmoid_loss", "supcon_loss", "triplet_margin_loss", "triplet_mining"]
