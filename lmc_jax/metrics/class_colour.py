"""The exact mixture's class figures: which class's mean colour an image ends nearest.

On the Gaussian mixture prior every class `k` has a mean colour `mu_k` [C] (`prior.params["mu"]`).
For images `x_n` [H, W, C] made for target classes `y_n`:

    nearest_n  = argmin_k || mean_hw x_n - mu_k ||^2
    target_acc = 1/N sum_n [nearest_n = y_n]
    saturation = 1/N sum_n || mean_hw x_n || / || mu_{y_n} ||      (lmc_jax.metrics.color)

(one function for the testbed's mixture run, image editing and image-to-image).
"""

from __future__ import annotations

import numpy as np

from lmc_jax.metrics.color import saturation_per_image


def nearest_class(images: np.ndarray, class_means: np.ndarray) -> np.ndarray:
    """[N] index of the class mean colour (`class_means` [K, C]) nearest to each image's mean
    colour (`images` [N, H, W, C])."""
    colour = np.asarray(images, np.float64).mean(axis=(1, 2))
    means = np.asarray(class_means, np.float64)
    return np.argmin(((colour[:, None] - means[None]) ** 2).sum(-1), axis=1)


def class_colour_figures(images: np.ndarray, class_means: np.ndarray,
                         targets: np.ndarray | int) -> dict[str, float]:
    """`{target_acc, saturation}` of `images` [N, H, W, C] made for `targets` ([N] or one
    class for all) against the mixture's `class_means` [K, C] (module docstring)."""
    targets = np.broadcast_to(np.asarray(targets), (len(images),))
    means = np.asarray(class_means, np.float32)
    return {"target_acc": float(np.mean(nearest_class(images, means) == targets)),
            "saturation": float(np.mean(saturation_per_image(images, means[targets])))}
