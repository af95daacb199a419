"""The private transformers API this package relies on, in one place: where no public hook exists, each use is listed
here with what we need of it, and fails loudly here when a transformers release changes it (setup.py's upper bound
keeps untested releases out; widen it only with this file passing).
"""

import inspect

import pytest
import torch
from transformers import PreTrainedModel, ProcessorMixin
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.image_processing_backends import PilBackend
from transformers.utils import PushToHubMixin
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

import modeling_transfusion as mt
from modeling_transfusion.processing import TransfusionImageProcessor

# name -> (owner, attribute, the parameters we call it with, where we use it and why)
PRIVATE_TRANSFORMERS_API = {
    "attention check": (
        PreTrainedModel,
        "_check_and_adjust_attn_implementation",
        ["attn_implementation"],
        "TransfusionPreTrainedModel: refuse flash attention with the reason (it cannot express the image mask)",
    ),
    "weight init": (
        PreTrainedModel,
        "_init_weights",
        ["module"],
        "TransfusionPreTrainedModel: zero-init of the diffusion head (the documented override point for init)",
    ),
    "image preprocessing": (
        PilBackend,
        "_preprocess",
        ["images"],
        "TransfusionImageProcessor: grey/RGB conversion and the [-1, 1] range around the backend's resize",
    ),
    "image structure": (
        PilBackend,
        "_prepare_images_structure",
        ["images"],
        "TransfusionImageProcessor: nested image lists and zero-size images",
    ),
    "hub upload": (
        PushToHubMixin,
        "_upload_modified_files",
        ["working_dir", "repo_id", "files_timestamps"],
        "TransfusionPreTrainedModel: the weights that save_pretrained(push_to_hub=True) uploads carry their save id",
    ),
    "output recorders": (
        type(_CAN_RECORD_REGISTRY),
        "__setitem__",
        ["model", "can_record_outputs"],
        "add_image_experts: the routed backbone class registers its base's recorders (output_hidden_states, "
        "output_attentions; tests/test_experts.py checks they are returned)",
    ),
    "processor kwargs": (
        ProcessorMixin,
        "_merge_kwargs",
        ["ModelProcessorKwargs", "tokenizer_init_kwargs"],
        "TransfusionProcessor.__call__: the text and image kwargs, merged as every processor does",
    ),
}


@pytest.mark.parametrize("name", sorted(PRIVATE_TRANSFORMERS_API))
def test_private_api_still_has_the_signature_we_call(name):
    owner, attribute, parameters, _ = PRIVATE_TRANSFORMERS_API[name]
    method = getattr(owner, attribute, None)
    assert callable(method), f"transformers removed {owner.__name__}.{attribute} ({name})"
    signature = inspect.signature(method).parameters
    missing = [parameter for parameter in parameters if parameter not in signature]
    assert not missing, f"{owner.__name__}.{attribute} no longer takes {missing}: {list(signature)}"


def test_the_overrides_are_reached():
    with pytest.raises(ValueError, match="cannot express Transfusion's mask"):
        mt.TransfusionForConditionalGeneration(_tiny_config(attn_implementation="flash_attention_2"))
    decoder = mt.TransfusionForConditionalGeneration(_tiny_config()).model.patch_decoder.proj
    assert torch.count_nonzero(decoder.weight) == 0 and torch.count_nonzero(decoder.bias) == 0, "_init_weights ran"
    pixels = TransfusionImageProcessor(size=8, num_channels=1)(
        [torch.full((3, 8, 8), 255, dtype=torch.uint8)], return_tensors="pt"
    )["pixel_values"]
    assert pixels.shape == (1, 1, 8, 8) and torch.allclose(pixels, torch.ones(1)), "_preprocess ran"


def test_checkpoint_key_renaming_is_registered_and_reversible():
    """`conversion_mapping` and `core_model_loading` are public modules but not top-level exports."""
    assert "model_type_or_class_name" in inspect.signature(register_checkpoint_conversion_mapping).parameters
    renamings = get_checkpoint_conversion_mapping("transfusion")
    assert renamings and all(isinstance(renaming, WeightRenaming) for renaming in renamings)


def _tiny_config(**kwargs) -> mt.TransfusionConfig:
    text_config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    return mt.TransfusionConfig(
        text_config=text_config, image_size=8, num_channels=1, boi_token_id=61, eoi_token_id=62, image_token_id=63,
        **kwargs,
    )  # fmt: skip
