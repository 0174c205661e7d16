"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester` of the installed release, see
`upstream_transformers.py`) on CALM's three model classes, the way transformers tests its own models
(`tests/models/llama/test_modeling_llama.py`): a model tester with tiny configs, then the mixin's tests as they are.

A test is skipped here only where it needs next-token logits, scores or a likelihood, which CALM does not have (its
head samples whole chunks without one); each skip says which. The mixin's own skips (GPU, flash attention, `@slow`)
are transformers' decisions and stay as they are.
"""

import functools
import inspect
import unittest
from unittest import mock

import pytest
import torch
from factories import TINY_AUTOENCODER, TINY_BACKBONE, TINY_HEAD
from upstream_transformers import load

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmConfig, CalmForCausalLM, CalmModel

common = load("test_modeling_common")
ConfigTester = load("test_configuration_common").ConfigTester
ModelTesterMixin, ids_tensor = common.ModelTesterMixin, common.ids_tensor

# The mixin tells base models and causal LMs apart by transformers' own name tables (`modeling_auto.py`), where a
# model of the library is listed; CALM registers with the Auto classes instead. Listed here for the tests' run, as
# transformers would list it: CalmModel the base model, CalmForCausalLM the causal LM.
NAME_TABLES = ((common.MODEL_MAPPING_NAMES, "CalmModel"), (common.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "CalmForCausalLM"))

NO_LOGITS = (
    "needs next-token logits, which CALM does not have: its head samples a chunk's latent vector without a likelihood"
)


class CalmModelTester:
    """Tiny CALMs and inputs in whole chunks: `seq_length` tokens, i.e. `encoder_seq_length` chunks of K, the backbone's
    positions (one hidden state and one attention row per chunk). Left padding in the attention mask of one row."""

    def __init__(self, parent, batch_size=2, num_chunks=3, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.patch_size = TINY_AUTOENCODER["patch_size"]
        self.vocab_size = TINY_AUTOENCODER["vocab_size"]
        self.seq_length = num_chunks * self.patch_size
        self.encoder_seq_length = num_chunks
        self.hidden_size = TINY_BACKBONE["hidden_size"]
        self.num_hidden_layers = TINY_BACKBONE["num_hidden_layers"]
        self.num_attention_heads = TINY_BACKBONE["num_attention_heads"]

    def get_config(self) -> CalmConfig:
        return CalmConfig(
            backbone_config={"model_type": "llama", **TINY_BACKBONE},
            autoencoder_config={**TINY_AUTOENCODER, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
            **TINY_HEAD,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, : self.patch_size + 1] = 0  # one left-padded row: a padded chunk and a partial one
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class CalmModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CalmModel, CalmForCausalLM)
    # CALM's generate is its own (chunks, no logits); transformers' GenerationTesterMixin is not in the sdist.
    # test_generation_common.py covers what it checks that needs no logits.
    all_generative_model_classes = ()
    # The mixin dates a model by the copyright line of its config's file (CALM's has none) and skips the check that
    # `_init_weights` covers every weight for models before 2023: CALM is of 2025.
    test_can_init_all_missing_weights_before_2023 = True
    _is_composite = True  # CalmConfig composes sub-configs (backbone, autoencoder), as transformers' multimodal models

    def setUp(self):
        self.model_tester = CalmModelTester(self)
        self.config_tester = ConfigTester(self, config_class=CalmConfig, has_text_modality=True)
        for table, name in NAME_TABLES:
            patch = mock.patch.dict(table, {CalmConfig.model_type: name})
            patch.start()
            self.addCleanup(patch.stop)

    def test_config(self):
        self.config_tester.run_common_tests()

    # CALM's autoencoder is frozen on purpose (no gradient, also in training); releases of the mixin that do not yet
    # leave out intentionally frozen parameters (transformers < 5.2x) would count them as missing gradients.
    test_all_params_have_gradient = "intentionally_frozen" in inspect.getsource(
        ModelTesterMixin.check_training_gradient_checkpointing
    )

    if hasattr(ModelTesterMixin, "test_bc_cache_name_forward"):  # transformers >= 5.24
        # The mixin checks the deprecation warning of `past_key_values` with `warnings.catch_warnings(record=True)`,
        # which keeps this suite's filter that turns a FutureWarning into an error.
        @pytest.mark.filterwarnings("always::FutureWarning")
        def test_bc_cache_name_forward(self):
            super().test_bc_cache_name_forward()

    def test_model_outputs_equivalence(self):
        # With labels, CALM's loss is a Monte Carlo estimate (head samples and posterior targets are drawn: there is
        # no likelihood to compute exactly), so the mixin's two calls compare equal draws: every call starts from
        # the same seed.
        forward = CalmForCausalLM.forward

        @functools.wraps(forward)
        def seeded_forward(*args, **kwargs):
            torch.manual_seed(0)
            return forward(*args, **kwargs)

        with mock.patch.object(CalmForCausalLM, "forward", seeded_forward):
            super().test_model_outputs_equivalence()

    if hasattr(ModelTesterMixin, "test_causal_lm_loss_honors_shift_labels"):

        @unittest.skip(reason=f"{NO_LOGITS}; it compares the loss with the cross-entropy of logits at shift_labels")
        def test_causal_lm_loss_honors_shift_labels(self):
            pass


class CalmAutoencoderTester:
    """Tiny autoencoders; `seq_length` tokens in chunks of K."""

    def __init__(self, parent, batch_size=2, num_chunks=3, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.vocab_size = TINY_AUTOENCODER["vocab_size"]
        self.seq_length = num_chunks * TINY_AUTOENCODER["patch_size"]
        self.hidden_size = TINY_AUTOENCODER["hidden_size"]
        config = self.get_config()
        self.num_hidden_layers = config.num_encoder_layers  # layers per stack (the encoder's, the decoder's)
        # `hidden_states`: the token embeddings, then every encoder and decoder layer's output.
        self.expected_num_hidden_layers = 1 + config.num_encoder_layers + config.num_decoder_layers

    def get_config(self) -> CalmAutoencoderConfig:
        return CalmAutoencoderConfig(**TINY_AUTOENCODER, pad_token_id=0)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": input_ids}


class CalmAutoencoderTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CalmAutoencoder,)
    has_attentions = False  # MLP layers only
    test_can_init_all_missing_weights_before_2023 = True  # as for CalmModelTest

    def setUp(self):
        self.model_tester = CalmAutoencoderTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=CalmAutoencoderConfig,
            common_properties=["hidden_size", "num_encoder_layers", "num_decoder_layers"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()
