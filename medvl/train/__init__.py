"""Training layer: recipes (model / data / loss defaults), the losses they train, and the trainer (`medvl train`)."""

from medvl.train.losses import DiseasePromptLoss, LocalizationLoss, MultiPositiveContrastiveLoss
from medvl.train.recipes import RECIPES, Recipe, RecipeLoss, create_loss, get_recipe
from medvl.train.trainer import TrainConfig, train

__all__ = ["DiseasePromptLoss", "LocalizationLoss", "MultiPositiveContrastiveLoss",
           "RECIPES", "Recipe", "RecipeLoss", "TrainConfig", "create_loss", "get_recipe", "train"]
