"""The ops: validation, torch.library registration, autograd, backend choice."""

from medvl.ops._dispatch import BackendUnavailable
from medvl.ops.patch_embed3d import patch_embed3d
from medvl.ops.sigmoid_loss import sigmoid_loss
from medvl.ops.triplet_mining import triplet_mining
from medvl.reference.triplet_mining import Triplets

__all__ = ["BackendUnavailable", "Triplets", "patch_embed3d", "sigmoid_loss", "triplet_mining"]
