"""The models: a 3D ViT volume tower, a Hugging Face text tower, and the CLIP model that joins them.

    model = medvl.models.create_model("vit3d-tiny")    # configs: medvl/models/configs/*.json
    out = model(int16_ct_batch, ["report one", "report two"])
"""

from medvl.models.checkpoint import checkpoint_hash, load_checkpoint
from medvl.models.clip import CLIPModel
from medvl.models.factory import create_model, list_models, model_config
from medvl.models.text_encoder import TextEncoder
from medvl.models.tokenizer import default_tokenizer, train_wordpiece
from medvl.models.volume_encoder import VolumeEncoder

__all__ = ["CLIPModel", "checkpoint_hash", "load_checkpoint", "TextEncoder", "VolumeEncoder", "create_model",
           "default_tokenizer", "list_models", "model_config", "train_wordpiece"]
