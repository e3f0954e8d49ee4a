"""vimssl: self-supervised pretraining and transfer of Vision Mamba (Vim) encoders.

``import vimssl`` imports torch only: Lightning, ``datasets`` and the CUDA kernel packages are
imported where they are used.
"""

from vimssl.hub import from_pretrained, push_to_hub, save_pretrained
from vimssl.models import VisionMamba, create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "VisionMamba",
    "__version__",
    "create_model",
    "from_pretrained",
    "list_models",
    "push_to_hub",
    "save_pretrained",
]
