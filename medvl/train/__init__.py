"""Training layer: recipes (model / data / loss defaults) and the losses they train."""

from medvl.train.losses import DiseasePromptLoss, LocalizationLoss, MultiPositiveContrastiveLoss
from medvl.train.recipes import RECIPES, Recipe, RecipeLoss, create_loss, get_recipe

__all__ = ["DiseasePromptLoss", "LocalizationLoss", "MultiPositiveContrastiveLoss",
           "RECIPES", "Recipe", "RecipeLoss", "create_loss", "get_recipe"]
