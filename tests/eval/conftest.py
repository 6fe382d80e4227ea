"""Tiny CT and MR checkpoints (two training steps) and their held-out evaluation sets, trained once for every
evaluation test."""

import pytest

from medvl.eval.cache import CachedEncoder
from medvl.eval.eval_set import EvalSet
from medvl.train.main import main as train_main

TINY = ["--steps", "2", "--batch-size", "4", "--n-train", "8", "--size", "32,32,16", "--no-progress"]
SIZE = (32, 32, 16)


@pytest.fixture(scope="package")
def ct_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-ct") / "siglip"
    assert train_main(["--recipe", "siglip", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="package")
def mr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-mr") / "mrclip"
    assert train_main(["--recipe", "mrclip", "--out", str(out), *TINY]) == 0
    return out


def _encoder_and_set(run, source, kind, n):
    from medvl.eval.loading import prompt_head_of
    from medvl.models.checkpoint import checkpoint_dir, load_checkpoint
    from medvl.data.sources import build_dataset

    model, _ = load_checkpoint(run)
    encoder = CachedEncoder(model, prompt_head=prompt_head_of(checkpoint_dir(run)))
    dataset, _ = build_dataset(source, kind, n=n, seed=100_000, size=SIZE)
    return encoder, EvalSet.from_dataset(dataset, kind, source=source, size=SIZE)


@pytest.fixture(scope="package")
def ct(ct_run):
    """(encoder, evaluation set) of 16 held-out CT phantoms."""
    return _encoder_and_set(ct_run, "synthetic-ct", "ct", 16)


@pytest.fixture(scope="package")
def mr(mr_run):
    """(encoder, evaluation set) of 24 held-out MR phantoms."""
    return _encoder_and_set(mr_run, "synthetic-mr", "mr", 24)
