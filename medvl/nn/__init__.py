"""nn.Modules, one per file: the fused ops' modules (thin: they call the functional form) and the losses built
on them, the recipes' other losses in plain PyTorch (each with its reference under the same name in
medvl.reference), and the standardisation of the embeddings."""

from medvl.nn import functional
from medvl.nn.disease_prompt_loss import DiseasePromptLoss
from medvl.nn.localization_loss import LocalizationLoss
from medvl.nn.multi_positive_loss import MultiPositiveContrastiveLoss
from medvl.nn.patch_embed3d import PatchEmbed3d
from medvl.nn.sigmoid_loss import SigLIPLoss
from medvl.nn.standardize import FeatureStandardizer
from medvl.nn.supcon_loss import SupConLoss
from medvl.nn.triplet_loss import MedTrimLoss, TripletLoss

__all__ = ["functional", "DiseasePromptLoss", "FeatureStandardizer", "LocalizationLoss", "MedTrimLoss",
           "MultiPositiveContrastiveLoss", "PatchEmbed3d", "SigLIPLoss", "SupConLoss", "TripletLoss"]
