"""The 'folder' data source: tfds image dataset, crop/convert, latent cache, grain batches."""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from lmc_jax.data import folder
from lmc_jax.data.sources import make_source
from lmc_jax.errors import UserError
from lmc_jax.priors.gaussian import gaussian_prior

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
VALID = ["a.png", "b.jpg", "gray.png", "rgba.png", "sub/deep/pal.gif", "sub/w.webp", "wide.png"]


def _write_images(root) -> None:
    rng = np.random.default_rng(0)
    (root / "sub" / "deep").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "b.jpg")
    Image.new("L", (40, 40), 100).save(root / "gray.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, 20:] = (255, 0, 0, 255)  # opaque red right half, transparent black left half
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    # Wide image: only the central 64x64 square is green; the bands must be cropped away.
    wide = np.zeros((64, 96, 3), np.uint8)
    wide[:, :16], wide[:, 16:80], wide[:, 80:] = RED, GREEN, BLUE
    Image.fromarray(wide).save(root / "wide.png")
    Image.new("RGB", (36, 36), BLUE).convert("P").save(root / "sub" / "deep" / "pal.gif")
    Image.new("RGB", (32, 48), (10, 200, 30)).save(root / "sub" / "w.webp")
    (root / "junk.png").write_bytes(b"this is not an image")
    (root / "notes.txt").write_text("ignored: not an image extension")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_images(root)
    return root


def _cfg(path, cache_dir="") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"source": "folder", "path": str(path),
                                      "cache_dir": str(cache_dir)})


def test_dataset_contents_crop_and_conversion(image_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ds, _ = folder.image_dataset(str(image_dir), 32, str(tmp_path))
    names = [ds[i]["file_name"].decode() for i in range(len(ds))]
    assert names == VALID  # sorted, recursive, junk.png skipped
    ims = {name: ds[i]["image"] for i, name in enumerate(names)}
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in ims.values())
    wide = ims["wide.png"].astype(int)  # only LANCZOS ringing of the bands may remain
    assert wide[..., 1].min() >= 220 and wide[..., 0].max() <= 40 and wide[..., 2].max() <= 40
    assert np.all(ims["gray.png"] == 100)
    np.testing.assert_array_equal(ims["rgba.png"][:, :14], 255)  # transparent -> white
    np.testing.assert_array_equal(ims["rgba.png"][:, 18:], np.broadcast_to(RED, (32, 14, 3)))
    np.testing.assert_array_equal(ims["sub/deep/pal.gif"], np.broadcast_to(BLUE, (32, 32, 3)))
    np.testing.assert_allclose(ims["sub/w.webp"].reshape(-1, 3).mean(0), (10, 200, 30), atol=4)
    log = caplog.text
    assert "junk.png" in log and "not a decodable image" in log
    assert "converted 3 of 7 images" in log  # gray, rgba, palette gif


def test_changed_folder_or_resolution_rebuilds(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(root / f"{i}.png")
    cache = str(tmp_path / "cache")
    ds, fp = folder.image_dataset(str(root), 16, cache)
    assert len(ds) == 2
    again, fp_again = folder.image_dataset(str(root), 16, cache)
    assert fp_again == fp and len(again) == 2
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "2.png")
    ds2, fp2 = folder.image_dataset(str(root), 16, cache)
    assert fp2 != fp and len(ds2) == 3
    ds3, _ = folder.image_dataset(str(root), 8, cache)
    assert ds3[0]["image"].shape == (8, 8, 3)
    built = os.listdir(os.path.join(cache, "lmc_image_folder"))
    assert sorted(built) == sorted([f"res16_{fp}", f"res16_{fp2}", f"res8_{fp2}"])


def test_pixel_batches_shape_range_determinism(image_dir, tmp_path):
    prior = gaussian_prior(resolution=32)
    src = make_source(_cfg(image_dir), prior, 3, 7, False, str(tmp_path / "run1"))
    x, emb = src(0)
    assert isinstance(x, jnp.ndarray) and x.shape == (3, 32, 32, 3) and x.dtype == jnp.float32
    assert emb.shape[0] == 3
    np.testing.assert_array_equal(emb, jnp.broadcast_to(prior.embed_text([""]), emb.shape))
    ds, _ = folder.image_dataset(str(image_dir), 32, str(tmp_path / "run1" / "data"))
    all_x = np.stack([ds[i]["image"] for i in range(len(ds))]).astype(np.float32) / 127.5 - 1
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0

    def ids(batch):  # which dataset image each sample is
        d = np.abs(np.asarray(batch)[:, None] - all_x[None]).max(axis=(2, 3, 4))
        assert np.all(d.min(1) < 1e-6)
        return list(d.argmin(1))

    # 7 images, batch 3: 2 batches per epoch, remainder dropped; no repeats within an epoch.
    for epoch in range(3):
        seen = ids(src(2 * epoch)[0]) + ids(src(2 * epoch + 1)[0])
        assert len(set(seen)) == 6
    assert ids(src(0)[0]) + ids(src(1)[0]) != ids(src(2)[0]) + ids(src(3)[0])  # reshuffled
    # An independent source (fresh cache, fresh process state) gives the same batch per step.
    other = make_source(_cfg(image_dir, tmp_path / "cache2"), prior, 3, 7, False, "unused")
    for step in (5, 0, 3):
        np.testing.assert_array_equal(other(step)[0], src(step)[0])
    reseeded = make_source(_cfg(image_dir), prior, 3, 8, False, str(tmp_path / "run1"))
    assert not np.array_equal(reseeded(0)[0], src(0)[0]) or not np.array_equal(
        reseeded(1)[0], src(1)[0])


@pytest.fixture(scope="module")
def tiny_sd():
    from lmc_jax.priors.sd import tiny_sd_prior

    return tiny_sd_prior(image_size=64)


def test_latent_cache_created_and_reused(image_dir, tmp_path, tiny_sd):
    calls = []

    def counting_encode(params, images):
        calls.append(images.shape)
        return tiny_sd.encode_fn(params, images)

    prior = tiny_sd.replace(encode_fn=counting_encode)
    src = folder.folder_source(_cfg(image_dir), prior, 4, 0, str(tmp_path))
    assert calls, "the first construction must encode"
    cache = os.path.join(str(tmp_path), "data")
    files = [f for f in os.listdir(cache) if f.startswith("latents-") and f.endswith(".npy")]
    assert len(files) == 1
    latents = np.load(os.path.join(cache, files[0]))
    assert latents.shape == (7, 32, 32, 4)
    x, emb = src(1)
    assert x.shape == (4, 32, 32, 4) and emb.shape[0] == 4
    # The cached latents are prior.encode of the dataset images, in dataset order.
    ds, _ = folder.image_dataset(str(image_dir), 64, cache)
    ims = np.stack([ds[i]["image"] for i in range(len(ds))]).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(latents, tiny_sd.encode(jnp.asarray(ims)), rtol=1e-4, atol=1e-4)
    assert all(np.abs(latents - xi).max(axis=(1, 2, 3)).min() < 1e-6 for xi in np.asarray(x))

    calls.clear()
    mtime = os.stat(os.path.join(cache, files[0])).st_mtime_ns
    again = folder.folder_source(_cfg(image_dir), prior, 4, 0, str(tmp_path))
    assert not calls, "the second construction must reuse the latent cache"
    assert os.stat(os.path.join(cache, files[0])).st_mtime_ns == mtime
    np.testing.assert_array_equal(again(1)[0], x)


def test_errors(image_dir, tmp_path):
    prior = gaussian_prior(resolution=32)
    wd = str(tmp_path / "wd")
    with pytest.raises(UserError, match=r"data.path is empty; set --config.data.path=DIR"):
        folder.folder_source(_cfg(""), prior, 2, 0, wd)
    with pytest.raises(UserError, match=r"does not exist; set --config.data.path=DIR"):
        folder.folder_source(_cfg(tmp_path / "missing"), prior, 2, 0, wd)
    with pytest.raises(UserError, match=r"is a file, not a folder"):
        folder.folder_source(_cfg(image_dir / "a.png"), prior, 2, 0, wd)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(UserError, match=r"no images in .*looked for \.png, \.jpg, \.jpeg"):
        folder.folder_source(_cfg(empty), prior, 2, 0, wd)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    (junk / "y.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"none of the 2 image files .* could be decoded"):
        folder.folder_source(_cfg(junk), prior, 2, 0, wd)
    with pytest.raises(UserError, match=r"has 7 usable images but the batch size is 8"):
        folder.folder_source(_cfg(image_dir), prior, 8, 0, wd)
    with pytest.raises(UserError, match=r"square RGB"):
        folder.folder_source(_cfg(image_dir), gaussian_prior(resolution=32, channels=1), 2, 0, wd)


def test_exif_orientation_applied_before_crop(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40], a[:, 40:] = RED, BLUE  # stored wide: red left, blue right
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: tall, red on top
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x, converted = folder.load_image(str(tmp_path / "rot.jpg"), 16)
    assert x.shape == (16, 16, 3) and not converted
    assert x[:6, :, 0].min() > 200 and x[:6, :, 2].max() < 50  # top rows red
    assert x[10:, :, 2].min() > 200 and x[10:, :, 0].max() < 50  # bottom rows blue
