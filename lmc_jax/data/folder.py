"""A folder of images as training data: a tfds array_record dataset, cached latents, grain batches.

Everything is cached under `data.cache_dir` (default `<workdir>/data`):

1. `ImageFolder`, a tensorflow-datasets builder, reads every image under `data.path`
   (recursively, sorted; see `IMAGE_EXTENSIONS`, GIFs give their first frame), applies the EXIF
   orientation, converts it to RGB (transparent pixels are composited onto white), resizes the
   short side to the resolution and center-crops a square (one LANCZOS resampling of the central
   square), and writes uint8 images (PNG) plus the relative file name as array_record. Its config
   name holds the resolution and a fingerprint of the folder listing (names, sizes, mtimes), so
   adding, removing or editing an image, or changing the resolution, builds a new dataset.
   Files that do not decode are skipped with a warning; an image over PIL's decompression-bomb
   limit (e.g. 14000x14000) stops the run with a `UserError` naming it (downscale or move it).
2. Latent priors: all images are encoded once through `prior.encode` and saved as one .npy
   named after the prior, the resolution and the fingerprint. Pixel priors read the images from
   the dataset and scale them to [-1, 1].
3. `batch(step)`: epoch `e = step // (n // batch)` visits the samples in grain's shuffle order
   for `(seed, e)`; batches never straddle two epochs (the remainder is dropped), so a batch
   never repeats a sample, and the result depends only on `(seed, step)`: a resumed run sees
   the same data.

Resolution = `prior.image_shape[0]` (square images only). The conditioning is the null prompt.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from lmc_jax.errors import UserError
from lmc_jax.priors.base import Prior

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
ENCODE_CHUNK = 16  # images per prior.encode call when caching latents
_DECODE_CHUNK = 64  # images decoded concurrently while building the dataset
_PATH_HINT = "set --config.data.path=DIR to a folder of images"

Batch = tuple[jax.Array, jax.Array]


def list_images(root: str) -> list[str]:
    """Relative paths ('/'-separated) of the image files under `root`, recursively, sorted."""
    found = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def fingerprint(root: str, files: Sequence[str]) -> str:
    """A short hash of the listing: relative names, sizes and modification times."""
    h = hashlib.sha256()
    for rel in files:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """RGB version of `image` and whether it needed converting (alpha is composited on white)."""
    if image.mode == "RGB":
        return image, False
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16/32-bit grayscale
        a = np.asarray(image).astype(np.float64)
        a = a / 257.0 if a.max() > 255 else a
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB"), True
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), True
    return image.convert("RGB"), True


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """Short side resized to `resolution`, center-cropped square: uint8 [res, res, 3]."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) / 2.0, (h - s) / 2.0
    out = image.resize((resolution, resolution), Image.Resampling.LANCZOS,
                       box=(left, top, left + s, top + s))
    return np.asarray(out, np.uint8)


def _too_big(path: str, e: BaseException) -> UserError:
    return UserError(f"image {path!r} in data.path is too large to decode safely ({e}); "
                     "downscale it (its short side only needs the prior's resolution) or move "
                     "it out of data.path")


def load_image(path: str, resolution: int) -> tuple[np.ndarray, bool]:
    """Decodes, orients, converts and crops one file: (uint8 [res, res, 3], converted?).

    Raises whatever PIL raises for a file that is not a decodable image.
    """
    with Image.open(path) as im:
        w, h = im.size
        s = min(w, h)
        if s > 4 * resolution:  # JPEG: decode at a reduced scale, keeping >= 2x resolution
            r2 = 2 * resolution
            im.draft(None, (math.ceil(w * r2 / s), math.ceil(h * r2 / s)))
        im.load()
        im = ImageOps.exif_transpose(im)
        rgb, converted = to_rgb(im)
        return center_crop_resize(rgb, resolution), converted


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The images of one folder at one resolution, as a tfds dataset with a 'train' split."""

    name = "lmc_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "RGB, short side resized, center-cropped, PNG-encoded."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code folder, so no checksums file. (tfds 4.9.10's own lookup also imports the
        `importlib_resources` backport, which Python >= 3.9 installs do not have.)"""
        return None

    def __init__(self, *, folder: str, files: Sequence[str], resolution: int, fingerprint: str,
                 data_dir: str):
        self._folder = folder
        self._files = list(files)
        self._resolution = int(resolution)
        config = tfds.core.BuilderConfig(
            name=f"res{resolution}_{fingerprint}",
            description=f"{folder} at {resolution}x{resolution}",
        )
        super().__init__(config=config, data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: `dataset_info_from_configs` wants a package dir with checksums.
        r = self._resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description="A folder of images, resized and center-cropped (lmc_jax.data.folder).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                "file_name": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep the sorted file order
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {"train": self._generate_examples()}

    def _decoded(self) -> Iterator[tuple[str, np.ndarray | None, bool, str]]:
        """(name, image or None, converted?, error) per file, in order; decoded in threads."""

        def work(rel):
            try:
                image, converted = load_image(os.path.join(self._folder, rel), self._resolution)
                return rel, image, converted, ""
            except Image.DecompressionBombError as e:
                raise _too_big(os.path.join(self._folder, rel), e) from None
            except Exception as e:  # noqa: BLE001 - any other decode failure skips the file
                return rel, None, False, f"{type(e).__name__}: {e}"

        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for i in range(0, len(self._files), _DECODE_CHUNK):
                yield from pool.map(work, self._files[i:i + _DECODE_CHUNK])

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        skipped, converted, kept = [], 0, 0
        for rel, image, was_converted, error in self._decoded():
            if image is None:
                logging.warning("skipping %s: not a decodable image (%s)",
                                os.path.join(self._folder, rel), error)
                skipped.append(rel)
                continue
            converted += int(was_converted)
            kept += 1
            yield rel, {"image": Image.fromarray(image), "file_name": rel}
        if not kept:
            raise UserError(f"none of the {len(self._files)} image files in {self._folder!r} "
                            f"could be decoded (e.g. {self._files[0]!r}); {_PATH_HINT}")
        if converted:
            logging.info("converted %d of %d images in %s to RGB (grayscale, alpha or palette)",
                         converted, kept, self._folder)
        self.info.metadata.update({"skipped": skipped, "converted": converted})


def image_dataset(path: str, resolution: int, cache_dir: str) -> tuple[Any, str]:
    """Builds (or reuses) the dataset of folder `path`: (tfds data source, fingerprint)."""
    if not path:
        raise UserError(f"data.path is empty; {_PATH_HINT}")
    folder = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(folder):
        raise UserError(f"data.path {path!r} does not exist; {_PATH_HINT}")
    if not os.path.isdir(folder):
        raise UserError(f"data.path {path!r} is a file, not a folder; {_PATH_HINT}")
    files = list_images(folder)
    if not files:
        raise UserError(f"no images in {path!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                        f"recursively); add images there or {_PATH_HINT}")
    fp = fingerprint(folder, files)
    builder = ImageFolder(folder=folder, files=files, resolution=resolution, fingerprint=fp,
                          data_dir=cache_dir)
    builder.download_and_prepare()
    return builder.as_data_source()["train"], fp


def _to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def latent_cache_path(cache_dir: str, prior: Prior, resolution: int, fp: str) -> str:
    """Where the latents of one (prior, resolution, folder fingerprint) are cached."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", prior.name).strip("_")[:60]
    key = hashlib.sha256(f"{prior.name}\0{resolution}\0{fp}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"latents-{slug}-{resolution}px-{key}.npy")


def encode_all(prior: Prior, images: Any, chunk: int = ENCODE_CHUNK) -> np.ndarray:
    """`prior.encode` of every image of a data source, in fixed-size (padded) jitted chunks."""
    encode = jax.jit(lambda p, im: p.encode(im))
    n = len(images)
    chunk = max(1, min(chunk, n))
    out = np.empty((n, *prior.x_shape), np.float32)
    for i in range(0, n, chunk):
        idx = list(range(i, min(i + chunk, n)))
        ims = np.stack([ex["image"] for ex in images.__getitems__(idx)])
        ims = np.concatenate([ims, np.repeat(ims[-1:], chunk - len(idx), axis=0)])
        out[i:i + len(idx)] = np.asarray(encode(prior, jnp.asarray(_to_unit(ims))))[:len(idx)]
    return out


def cached_latents(prior: Prior, images: Any, path: str) -> np.ndarray:
    """The latents in `path` if it holds one per image, else `encode_all` saved there."""
    want = (len(images), *prior.x_shape)
    if os.path.exists(path):
        try:
            x = np.load(path)
            if x.shape == want:
                return x
            logging.warning("latent cache %s has shape %s, not %s; re-encoding", path, x.shape,
                            want)
        except (OSError, ValueError) as e:
            logging.warning("latent cache %s is unreadable (%s); re-encoding", path, e)
    logging.info("encoding %d images with %s into %s", len(images), prior.name, path)
    x = encode_all(prior, images)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, x)
    os.replace(tmp, path)
    return x


def _grain_seed(seed: int) -> int:
    """A well-mixed 32-bit seed (grain shuffles epoch e with seed + e)."""
    return int(np.random.SeedSequence(int(seed) % 2**32).generate_state(1)[0])


def folder_source(cfg: ml_collections.ConfigDict, prior: Prior, batch: int, seed: int,
                  workdir: str) -> Callable[[int], Batch]:
    """`batch(step) -> (x [batch, *x_shape], null-prompt emb [batch, ...])` from `cfg.path`."""
    h, w, c = prior.image_shape
    if h != w or c != 3:
        raise UserError(f"data.source='folder' needs a prior on square RGB images, but "
                        f"{prior.name!r} takes {h}x{w}x{c}; pick another data.source")
    if batch < 1:
        raise UserError(f"the batch size must be at least 1, got {batch}")
    cache_dir = os.path.abspath(os.path.expanduser(cfg.get("cache_dir", "") or
                                                   os.path.join(workdir, "data")))
    os.makedirs(cache_dir, exist_ok=True)
    images, fp = image_dataset(cfg.path, h, cache_dir)
    n = len(images)
    if n < batch:
        raise UserError(f"{cfg.path!r} has {n} usable images but the batch size is {batch}; "
                        f"add images or lower the batch size to {n} or less")
    if prior.kind == "latent":
        latents = cached_latents(prior, images, latent_cache_path(cache_dir, prior, h, fp))
        samples = grain.MapDataset.source(latents).shuffle(seed=_grain_seed(seed))
    else:
        samples = (grain.MapDataset.source(images).shuffle(seed=_grain_seed(seed))
                   .map(lambda ex: _to_unit(ex["image"])))
    steps_per_epoch = n // batch
    null = prior.embed_text([""])
    emb = jnp.broadcast_to(null, (batch, *null.shape[1:]))

    def get(step: int) -> Batch:
        step = int(step)
        if step < 0:
            raise UserError(f"batch step must be >= 0, got {step}")
        epoch, k = divmod(step, steps_per_epoch)
        start = epoch * n + k * batch  # grain's shuffle: index e*n + i is epoch e's i-th sample
        x = np.stack([samples[start + j] for j in range(batch)])
        return jnp.asarray(x), emb

    return get
