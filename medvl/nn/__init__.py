"""nn.Modules over the functional ops. Modules are thin: they only call the functional form."""

from medvl.nn import functional
from medvl.nn.patch_embed3d import PatchEmbed3d
from medvl.nn.sigmoid_loss import SigLIPLoss
from medvl.nn.standardize import FeatureStandardizer
from medvl.nn.supcon_loss import SupConLoss
from medvl.nn.triplet_loss import MedTrimLoss, TripletLoss

__all__ = ["functional", "FeatureStandardizer", "MedTrimLoss", "PatchEmbed3d", "SigLIPLoss", "SupConLoss", "TripletLoss"]
