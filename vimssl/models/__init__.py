"""Vision Mamba models: the encoder, its mixer, and the registry of sizes. Imports torch only."""

from vimssl.models.blocks import Block
from vimssl.models.mixer import BiMambaMixer
from vimssl.models.registry import MODEL_SIZES, create_model, list_models, model_defaults
from vimssl.models.vim import VisionMamba

__all__ = [
    "MODEL_SIZES",
    "BiMambaMixer",
    "Block",
    "VisionMamba",
    "create_model",
    "list_models",
    "model_defaults",
]
