"""transformers-calm: CALM (Continuous Autoregressive Language Models, arXiv 2510.27688) for Hugging Face
transformers. Importing the package registers the CALM model types with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel

from .configuration_calm_autoencoder import CalmAutoencoderConfig
from .modeling_calm_autoencoder import CalmAutoencoder, CalmAutoencoderOutput

__version__ = "0.1.0"

AutoConfig.register(CalmAutoencoderConfig.model_type, CalmAutoencoderConfig, exist_ok=True)
AutoModel.register(CalmAutoencoderConfig, CalmAutoencoder, exist_ok=True)

# Saved checkpoints carry an auto_map and the module files, so they also load with trust_remote_code=True where
# this package is not installed.
CalmAutoencoderConfig.register_for_auto_class()
CalmAutoencoder.register_for_auto_class("AutoModel")

__all__ = ["CalmAutoencoder", "CalmAutoencoderConfig", "CalmAutoencoderOutput", "__version__"]
