"""Model loading through the user's path: a registered config, a local checkpoint, clear errors; the
encoding the embed stage and the endpoint share."""

import numpy as np
import pytest
import torch
from PIL import Image

from rebalance.models import TINY_MODEL, list_models, load_model


def test_tiny_model_is_registered_and_deterministic():
    assert TINY_MODEL in list_models()
    a, b = load_model(TINY_MODEL, None, seed=3), load_model(TINY_MODEL, None, seed=3)
    assert a.dim == 64
    tokens = a.tokenizer(["a red circle", "a blue square"])
    with torch.no_grad():
        np_a, np_b = a.model.encode_text(tokens), b.model.encode_text(tokens)
    torch.testing.assert_close(np_a, np_b)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    source = load_model(TINY_MODEL, None, seed=11)
    path = tmp_path / f"tiny{suffix}"
    state = source.model.state_dict()
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_model(
        TINY_MODEL, str(path), seed=0
    )  # a different seed: the weights must come from the file
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(image), source.model.encode_image(image))


def test_unknown_model_and_uncached_tag(monkeypatch):
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        load_model("ViT-Nope", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="local path"):
        load_model(TINY_MODEL, "laion2b_s34b_b79k")


def test_encode_images_and_texts_are_the_towers_outputs_normalised():
    loaded = load_model(TINY_MODEL, None, seed=5)
    images = [torch.rand(3, 32, 32) for _ in range(3)]
    texts = ["a red circle", "a blue square"]
    got_images, got_texts = loaded.encode_images(images), loaded.encode_texts(texts)
    with torch.no_grad():
        raw_images = loaded.model.encode_image(torch.stack(images))
        raw_texts = loaded.model.encode_text(loaded.tokenizer(texts))
    # e / ||e|| of the model's own outputs, float32, one row per input
    expected_images = (raw_images / raw_images.norm(dim=1, keepdim=True)).numpy()
    expected_texts = (raw_texts / raw_texts.norm(dim=1, keepdim=True)).numpy()
    assert got_images.dtype == got_texts.dtype == np.float32
    np.testing.assert_allclose(got_images, expected_images, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_texts, expected_texts, rtol=1e-5, atol=1e-6)
    assert loaded.encode_images([]).shape == loaded.encode_texts([]).shape == (0, 64)
    # training transforms come with the model (random crops for the training jobs)
    assert loaded.preprocess_train(Image.new("RGB", (48, 40))).shape == (3, 32, 32)
