"""A tiny random CLIP for the tests (tests/test_metrics.py, tests/test_clip_pytorch.py): built
with transformers, saved like a download (Flax or PyTorch layout), and its cosines computed
independently of lmc_jax (transformers' own feature functions, normalized in numpy)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from lmc_jax import _compat
from lmc_jax.priors.tokenizer import byte_tokenizer_path


def _random_params(shapes, seed: int):
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        kind, shape = path[-1].key, tuple(spec.shape)
        if kind == "logit_scale":
            return np.asarray(np.log(1 / 0.07), np.float32)
        if kind == "kernel":
            return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        if kind == "bias":
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if kind == "scale":
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return rng.standard_normal(shape).astype(np.float32)  # embeddings, class_embedding

    return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


def random_clip(size: int, layers: int = 2, seed: int = 0):
    """(FlaxCLIPModel, params, tokenizer): width 32, `layers` layers per tower, patch 8."""
    tr = _compat.transformers()
    tokenizer = tr.CLIPTokenizer.from_pretrained(str(byte_tokenizer_path()))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=size, patch_size=8)
    config = tr.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = tr.FlaxCLIPModel(config, _do_init=False)
    return model, _random_params(model.params_shape_tree, seed), tokenizer


def save_clip(folder: Path, model, params, tokenizer, mean, std, pytorch: bool = False) -> Path:
    """Writes the model as a download has it: Flax (`flax_model.msgpack`) or PyTorch
    (`model.safetensors` with PyTorch names, no Flax file), tokenizer and image processor with
    `mean`/`std` (non-default values make a loader that ignores them fail)."""
    tr = _compat.transformers()
    size = model.config.vision_config.image_size
    if pytorch:
        from safetensors.numpy import save_file

        from lmc_jax.priors.sd_tiny import pytorch_state_dict

        model.config.architectures = ["CLIPModel"]
        model.config.save_pretrained(folder)
        save_file(pytorch_state_dict(params), str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        model.save_pretrained(folder, params=params)
    tokenizer.save_pretrained(folder)
    tr.CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size, image_mean=list(mean),
                          image_std=list(std)).save_pretrained(folder)
    return folder


def numpy_cosines(model, params, tokenizer, images: np.ndarray, prompts: list[str], mean, std
                  ) -> np.ndarray:
    """[n_images, n_prompts] cosines from transformers' `get_image_features` /
    `get_text_features` on `images` in (-1, 1), preprocessed and normalized in numpy."""
    x01 = np.clip((images.astype(np.float64) + 1) / 2, 0, 1)
    pixels = ((x01 - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)
    image_fn = jax.jit(lambda p, x: model.get_image_features(x, params=p))  # eager is slower
    text_fn = jax.jit(lambda p, ids, mask: model.get_text_features(ids, mask, params=p))
    img = np.asarray(image_fn(params, pixels.astype(np.float32)), np.float64)
    tok = tokenizer(prompts, padding=True, return_tensors="np")  # longest, not max_length
    txt = np.asarray(text_fn(params, tok.input_ids, tok.attention_mask), np.float64)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img @ txt.T
