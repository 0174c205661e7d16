"""transformers-calm: CALM (Continuous Autoregressive Language Models, arXiv 2510.27688) for Hugging Face
transformers. Importing the package registers the CALM model types with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .brierlm import BRIERLM_PATH, load_brierlm
from .configuration_calm import CalmConfig
from .configuration_calm_autoencoder import CalmAutoencoderConfig
from .generation_configuration_calm import CalmGenerationConfig
from .hub import enable_hub_features
from .model_card import create_model_card
from .modeling_calm import CalmCausalLMOutputWithPast, CalmForCausalLM, CalmModel, CalmPreTrainedModel
from .modeling_calm_autoencoder import CalmAutoencoder, CalmAutoencoderOutput, CalmAutoencoderPreTrainedModel
from .modeling_energy_head import CalmEnergyHead

__version__ = "0.3.0"

AutoConfig.register(CalmAutoencoderConfig.model_type, CalmAutoencoderConfig, exist_ok=True)
AutoModel.register(CalmAutoencoderConfig, CalmAutoencoder, exist_ok=True)
AutoConfig.register(CalmConfig.model_type, CalmConfig, exist_ok=True)
AutoModel.register(CalmConfig, CalmModel, exist_ok=True)
AutoModelForCausalLM.register(CalmConfig, CalmForCausalLM, exist_ok=True)


class CalmAutoencoderIsNotACausalLM:
    """Stands in the causal-LM Auto mapping for the autoencoder's config, so that `AutoModelForCausalLM` (and
    `pipeline("text-generation")`) on an autoencoder folder says what the folder holds and what to do, instead of
    listing every config transformers knows. Never instantiated."""

    config_class = CalmAutoencoderConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ValueError(
            "This is a CALM autoencoder (CalmAutoencoderConfig), not a language model: load it with "
            "AutoModel.from_pretrained or CalmAutoencoder.from_pretrained. A CALM language model is built around it "
            "with CalmForCausalLM.from_autoencoder(autoencoder, backbone_config=...) and trained (or `calm train`); "
            "a folder made by `calm train` holds the language model one level up."
        )

    from_config = _from_config = from_pretrained


AutoModelForCausalLM.register(CalmAutoencoderConfig, CalmAutoencoderIsNotACausalLM, exist_ok=True)

# Saved checkpoints then carry an auto_map and the module files, so they also load with trust_remote_code=True
# where this package is not installed.
CalmAutoencoderConfig.register_for_auto_class()
CalmAutoencoder.register_for_auto_class("AutoModel")
CalmConfig.register_for_auto_class()
CalmModel.register_for_auto_class("AutoModel")
CalmForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# The package's classes save atomically and write model cards (hub.py). The modeling files do not import that code:
# remote-code repositories carry only the model code, which then needs nothing but transformers.
enable_hub_features(CalmAutoencoderPreTrainedModel, CalmPreTrainedModel)


def __getattr__(name):
    # The trainers are imported on first use: importing transformers' Trainer (and accelerate) would slow down every
    # `import transformers_calm` by seconds.
    if name in ("CalmTrainer", "CalmTrainingArguments"):
        from . import trainer_calm

        return getattr(trainer_calm, name)
    if name == "CalmAutoencoderTrainer":
        from .trainer_calm_autoencoder import CalmAutoencoderTrainer

        return CalmAutoencoderTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BRIERLM_PATH",
    "CalmAutoencoder",
    "CalmAutoencoderConfig",
    "CalmAutoencoderOutput",
    "CalmAutoencoderTrainer",
    "CalmCausalLMOutputWithPast",
    "CalmConfig",
    "CalmEnergyHead",
    "CalmForCausalLM",
    "CalmGenerationConfig",
    "CalmModel",
    "CalmPreTrainedModel",
    "CalmTrainer",
    "CalmTrainingArguments",
    "__version__",
    "create_model_card",
    "load_brierlm",
]
