"""Collapse diagnostics: a fresh model's embeddings are near collapse until the batch standardises them, and
the threshold that tells a collapsed space from a spread one."""

import torch
import torch.nn.functional as F

from medvl.models import create_model
from medvl.models.diagnostics import COLLAPSE_COSINE, embedding_spread
from medvl.nn.standardize import batch_statistics, standardize


def _collapse_probe(standardize_towers: bool) -> float:
    """Mean cosine between two volumes of a fresh tiny model, as the training loss sees them."""
    torch.manual_seed(0)
    model = create_model("vit3d-tiny", vision={"img_size": [32, 32, 16]})
    volumes = torch.randint(-1000, 400, (8, 1, 32, 32, 16), dtype=torch.int16)
    with torch.no_grad():
        out = model(volumes, ["report"] * 8)
    features = out["image_features"]
    if standardize_towers:
        raw = out["image_embeddings"]
        features = F.normalize(standardize(raw, *batch_statistics(raw)), dim=-1)
    return embedding_spread(features)["image_offdiagonal_cosine"]["mean"]


def test_a_fresh_model_is_near_collapse_and_batch_standardisation_spreads_it():
    """Why the towers standardise: mean pooling makes two random volumes' embeddings nearly parallel."""
    assert _collapse_probe(False) > 0.9
    assert abs(_collapse_probe(True)) < 0.3


def test_collapse_threshold_separates_a_collapsed_space():
    torch.manual_seed(4)
    spread = torch.randn(16, 8)
    collapsed = torch.ones(16, 8) + 1e-3 * torch.randn(16, 8)
    assert not embedding_spread(spread, spread + 0.1 * torch.randn(16, 8))["collapsed"]
    result = embedding_spread(collapsed, spread)
    assert result["collapsed"] and result["image_offdiagonal_cosine"]["mean"] > COLLAPSE_COSINE
    # identical texts are not counted as a collapse of the text tower
    same = embedding_spread(spread, collapsed[:1].expand(16, 8), texts=["same"] * 16)
    assert same["text_offdiagonal_cosine"]["mean"] != same["text_offdiagonal_cosine"]["mean"]  # nan: no pair left
