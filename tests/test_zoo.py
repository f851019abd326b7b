"""The zoo builds genuine transformers classes; adapters read them by known paths."""

import pytest
import torch
from nnsight import NNsight

import vlmsae
from vlmsae import zoo

CLASS_NAMES = {
    "vit-gpt2": "VisionEncoderDecoderModel",
    "llava": "LlavaForConditionalGeneration",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3-vl": "Qwen3VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}


def test_layers_info(model, family):
    info = vlmsae.layers(model)
    assert type(model).__name__ == CLASS_NAMES[family]
    assert info.family == family and info.n_layers == 4 and info.d_model == 64
    assert info.layers is model.get_submodule(info.layer_path)
    assert info.has_image_tokens == (family != "vit-gpt2")
    assert info.hook_name(2) == "blocks.2.hook_resid_post"


def test_layers_of_an_nnsight_wrapped_model(family):
    model = zoo.tiny_model(family, n_layers=2)  # NNsight patches every module's forward: keep it off shared models
    info = vlmsae.layers(NNsight(model))
    assert info.model is model and info.layers is model.get_submodule(info.layer_path) and info.n_layers == 2


def test_from_pretrained_round_trip(model, family, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, local_files_only=True).eval()
    info = vlmsae.layers(loaded)
    assert (info.family, info.n_layers, info.layer_path) == (family, 4, vlmsae.layers(model).layer_path)
    inputs = zoo.tiny_inputs(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_qwen_patchify_matches_the_real_image_processor():
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8)
    processor = Qwen2VLImageProcessorPil(patch_size=zoo.QWEN_PATCH, merge_size=zoo.QWEN_MERGE,
                                         temporal_patch_size=zoo.QWEN_TEMPORAL, do_resize=False,
                                         do_normalize=False, do_rescale=True)
    ref = processor(images=[Image.fromarray(pixels.numpy())], return_tensors="pt")
    flat, grid = zoo.qwen_patchify(pixels.permute(2, 0, 1)[None].float() / 255)
    torch.testing.assert_close(grid, ref["image_grid_thw"])
    torch.testing.assert_close(flat, ref["pixel_values"].float(), rtol=0, atol=1e-6)


def test_zoo_rejects_bad_requests():
    with pytest.raises(vlmsae.ConfigError, match="family='gpt4'.*vit-gpt2"):
        zoo.tiny_model("gpt4")
    with pytest.raises(vlmsae.ConfigError, match="padding='middle'"):
        zoo.tiny_inputs(zoo.tiny_model("llava", n_layers=1), padding="middle")


def test_the_image_reaches_the_decoder_stream(model, family):
    """Two images give two different residuals at the image tokens (no zero-initialised projector cuts them off)."""
    info = vlmsae.layers(model)
    if not info.has_image_tokens:
        pytest.skip("ViT-GPT2: the image enters by cross-attention")
    inputs = zoo.build_inputs(model, torch.rand(2, 3, zoo.IMAGE_SIZE, zoo.IMAGE_SIZE), [[9, 10], [9, 10]])
    with torch.no_grad(), vlmsae.record(model, [0]) as rec:
        model(**inputs)
    image = rec.kinds(0)[0] == vlmsae.Kind.IMAGE
    assert (rec[0][0, image] - rec[0][1, image]).abs().amax(-1).min() > 1e-3
