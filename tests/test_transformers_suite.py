"""transformers' own common tests, `ModelTesterMixin` and `ConfigTester.run_common_tests`, on both CapsNet model
classes, with CapsNet counted as a built-in model (tests/transformers_suite.py fetches the test files).

The mixin skips its attention, flash/SDPA, RoPE, experts, tensor-parallel and GPU-only tests itself, each with its
reason; the only tests skipped here are those about token embeddings, which a pixels-in model has none of.
"""

import contextlib
import io
import tarfile
import tempfile
import unittest
from unittest import mock

import pytest
import torch
from conftest import small_config
from transformers.models.auto import get_values, modeling_auto
from transformers_suite import COMMON_TEST_FILES, extract_test_files, import_common_tests

from capsnet_hf import CapsNetConfig, CapsNetForImageClassification, CapsNetModel

test_modeling_common, test_configuration_common = import_common_tests()

# The mixin decides many tests by whether a class's name is in one of transformers' built-in mappings: which
# models train without labels, which get class labels, which are base models.
BUILT_IN_MAPPING_NAMES = {
    "MODEL_MAPPING_NAMES": CapsNetModel,
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": CapsNetForImageClassification,
}

# Options ConfigTester builds its configs with and reads back from their JSON.
CONFIG_OPTIONS = dict(conv1_channels=8, primary_capsule_types=2, capsule_dim=6, decoder_hidden_sizes=[16, 32])

NO_EMBEDDINGS = "CapsNet takes pixels: it has no token embeddings (to get, set or resize, or to train through)"


@contextlib.contextmanager
def counted_as_built_in():
    """CapsNet's classes in transformers' built-in mapping names inside the block, removed again after it."""
    with contextlib.ExitStack() as stack:
        for mapping_name, model_class in BUILT_IN_MAPPING_NAMES.items():
            names = getattr(modeling_auto, mapping_name)
            stack.enter_context(mock.patch.dict(names, {CapsNetConfig.model_type: model_class.__name__}))
        yield


@pytest.fixture(scope="class")
def capsnet_counts_as_built_in():
    with counted_as_built_in():
        yield


def test_counted_as_built_in_only_inside_the_block():
    def is_built_in():
        return CapsNetForImageClassification.__name__ in get_values(
            modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        ) and CapsNetModel.__name__ in get_values(modeling_auto.MODEL_MAPPING_NAMES)

    assert not is_built_in()
    with counted_as_built_in():
        assert is_built_in()
    assert not is_built_in()


def test_only_the_mixins_files_are_extracted_and_a_shipped_sibling_replaces_its_stand_in(tmp_path):
    sdist = tmp_path / "transformers-9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name in [*COMMON_TEST_FILES, "test_tokenization_common.py", "exporters/test_export.py"]:
            member = tarfile.TarInfo(f"transformers-9.9/tests/{name}")
            member.size = len(b"# test file\n")
            archive.addfile(member, io.BytesIO(b"# test file\n"))
    package = tmp_path / "cache" / "transformers_sdist_tests"
    extract_test_files(sdist, package)
    extracted = sorted(path.relative_to(package).as_posix() for path in package.rglob("*.py"))
    assert extracted == [
        "__init__.py",
        "exporters/__init__.py",
        "exporters/test_export.py",
        *sorted(COMMON_TEST_FILES),
    ]


class CapsNetModelTester:
    """Config and inputs for the mixin: the small CapsNet of tests/conftest.py."""

    def __init__(self, parent, batch_size: int = 3):
        self.parent = parent
        self.batch_size = batch_size
        config = self.get_config()
        self.num_channels = config.num_channels
        self.image_size = config.image_size[0]
        self.num_labels = config.num_labels
        self.is_training = True
        # The two capsule layers (PrimaryCaps, DigitCaps); hidden_states puts conv1's output in front of theirs, as a
        # transformer's does its embeddings'. The mixin checks the first one's last two sizes as [seq_length,
        # hidden_size]: conv1's grid ([B, C1, H1, W1]).
        self.num_hidden_layers = 2
        self.seq_length, self.hidden_size = config.conv1_grid_size

    def get_config(self) -> CapsNetConfig:
        return small_config()

    def prepare_config_and_inputs_for_common(self) -> tuple[CapsNetConfig, dict[str, torch.Tensor]]:
        pixel_values = torch.rand(self.batch_size, self.num_channels, self.image_size, self.image_size)
        return self.get_config(), {"pixel_values": pixel_values}


@pytest.mark.usefixtures("capsnet_counts_as_built_in")
class CapsNetModelTest(test_modeling_common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CapsNetModel, CapsNetForImageClassification)
    has_attentions = False
    # The mixin dates a model by a copyright line its config file lacks: run the init test as for a new model.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = CapsNetModelTester(self)
        self.config_tester = test_configuration_common.ConfigTester(
            self, config_class=CapsNetConfig, has_text_modality=False, common_properties=[], **CONFIG_OPTIONS
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_mixin_treats_capsnet_as_built_in(self):
        _, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for_classification = self._prepare_for_class(inputs, CapsNetForImageClassification, return_labels=True)
        assert for_classification["labels"].shape == (self.model_tester.batch_size,)
        assert "labels" not in self._prepare_for_class(inputs, CapsNetModel, return_labels=True)

    def test_ignoring_mismatched_sizes_reinitialises_only_the_class_layers(self):
        """What test_can_load_ignoring_mismatched_shapes skips for want of a Linear head: with another number of
        classes, only the parameters sized by it (class capsules, the decoder's input layer) are new."""
        model = CapsNetForImageClassification(self.model_tester.get_config())
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            with self.assertRaises(RuntimeError):
                CapsNetForImageClassification.from_pretrained(folder, num_labels=7)
            resized = CapsNetForImageClassification.from_pretrained(folder, num_labels=7, ignore_mismatched_sizes=True)
        sized_by_classes = {"capsnet.members.0.class_capsules.weight", "capsnet.members.0.class_capsules.bias"}
        sized_by_classes.add("decoder.layers.0.weight")
        old, new = dict(model.named_parameters()), dict(resized.named_parameters())
        seven_classes = dict(CapsNetForImageClassification(small_config(num_labels=7)).named_parameters())
        assert old.keys() == new.keys()
        for name, parameter in new.items():
            if name in sized_by_classes:
                assert parameter.shape == seven_classes[name].shape != old[name].shape, name
            else:
                torch.testing.assert_close(parameter, old[name], msg=name)
        assert resized(torch.rand(2, 1, 16, 16)).logits.shape == (2, 7)

    @unittest.skip(reason=NO_EMBEDDINGS)
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason=NO_EMBEDDINGS)
    def test_resize_tokens_embeddings(self):
        pass

    @unittest.skip(reason=NO_EMBEDDINGS)
    def test_resize_embeddings_untied(self):
        pass

    @unittest.skip(reason=NO_EMBEDDINGS)
    def test_resize_embeddings_untied_no_reinit_on_post_init(self):
        pass

    @unittest.skip(reason=NO_EMBEDDINGS)
    def test_enable_input_require_grads_with_gradient_checkpointing(self):
        pass
