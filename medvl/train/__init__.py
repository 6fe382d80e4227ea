"""Training layer: recipes (model / data / loss defaults, and the loss they train) and the trainer (`medvl train`).

The losses the recipes train are modules of :mod:`medvl.nn`."""

from medvl.train.recipes import RECIPES, Recipe, RecipeLoss, create_loss, get_recipe
from medvl.train.trainer import TrainConfig, train

__all__ = ["RECIPES", "Recipe", "RecipeLoss", "TrainConfig", "create_loss", "get_recipe", "train"]
