"""The radiance field: IPE of frustum Gaussians -> MLP -> density and albedo.

    h       = MLP(IPE(mu, Sigma))                             (ReLU, `depth` layers of `width`)
    sigma   = softplus(density_head(h) + blob(mu))
    blob(x) = blob_density exp(-|x|^2 / (2 blob_radius^2))    ('gaussian': DreamFusion's form)
    blob(x) = blob_density (1 - |x| / blob_radius)            ('linear': Magic3D's, threestudio's
                                                               default with softplus)
    albedo  = sigmoid(albedo_head(h))

The blob makes the initial field an opaque ball at the origin, which DreamFusion uses so that
the first renders show an object rather than empty space. The two shapes differ away from the
ball: the Gaussian tends to 0, so there `sigma = softplus(head) ~ softplus(0) = 0.69` (the
untrained head's output is near 0), a fog that fills the whole scene (with blob_density 10,
radius 0.5 and a scene of radius 1, 90% of the pixels of a view from 2.3 units are opaque); the
linear blob is negative beyond `blob_radius` (`softplus(-10) = 5e-5` at twice the radius), so
the scene starts as the ball alone. Colours are view-independent albedo; shading
(`shading.py`) turns them into lit colours.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lmc_jax.nerf import ipe

BLOB_SHAPES = ("gaussian", "linear")


def density_blob(x, blob_density, blob_radius, shape: str = "gaussian"):
    """The initial density bias; x: [..., 3] -> [...].

    'gaussian': `blob_density * exp(-|x|^2 / (2 blob_radius^2))`;
    'linear': `blob_density * (1 - |x| / blob_radius)` (`|x|` floored at 1e-6, so its gradient
    at the origin, used by the normals, is 0 rather than NaN).
    """
    r2 = jnp.sum(x**2, axis=-1)
    if shape == "gaussian":
        return blob_density * jnp.exp(-r2 / (2.0 * blob_radius**2))
    if shape == "linear":
        return blob_density * (1.0 - jnp.sqrt(jnp.maximum(r2, 1e-12)) / blob_radius)
    raise ValueError(f"unknown blob shape {shape!r}; choose one of {BLOB_SHAPES}")


class MLPField(nn.Module):
    """Mip-NeRF style field of density and albedo.

    Attributes:
      width: hidden width of the MLP.
      depth: number of hidden layers.
      min_deg, max_deg: IPE frequency levels 2^min_deg .. 2^(max_deg - 1).
      blob_density: peak of the density blob added before the activation (0 disables it).
      blob_radius: standard deviation ('gaussian') or zero crossing ('linear') of the blob
        (scene units).
      blob_shape: 'gaussian' or 'linear' (`density_blob`).
    """

    width: int = 64
    depth: int = 4
    min_deg: int = 0
    max_deg: int = 8
    blob_density: float = 10.0
    blob_radius: float = 0.5
    blob_shape: str = "gaussian"

    def setup(self):
        self.hidden = [nn.Dense(self.width, name=f"hidden_{i}") for i in range(self.depth)]
        self.density_head = nn.Dense(1, name="density_head")
        self.albedo_head = nn.Dense(3, name="albedo_head")

    def _features(self, means, covs):
        h = ipe.integrated_pos_enc(means, covs, self.min_deg, self.max_deg)
        for layer in self.hidden:
            h = nn.relu(layer(h))
        return h

    def _density(self, means, h):
        raw = self.density_head(h)[..., 0]
        raw = raw + density_blob(means, self.blob_density, self.blob_radius, self.blob_shape)
        return nn.softplus(raw)

    def __call__(self, means, covs):
        """Density and albedo of Gaussians.

        Args:
          means: [..., 3] Gaussian means (frustum centres).
          covs: [..., 3] diagonal covariances (zeros for points).

        Returns:
          density: [...] non-negative; albedo: [..., 3] in (0, 1).
        """
        h = self._features(means, covs)
        return self._density(means, h), nn.sigmoid(self.albedo_head(h))

    def density(self, means, covs):
        """Density only: [..., 3], [..., 3] -> [...] (for normals and mesh export)."""
        return self._density(means, self._features(means, covs))

    def albedo(self, means, covs):
        """Albedo only: [..., 3], [..., 3] -> [..., 3] in (0, 1) (for vertex colours)."""
        return nn.sigmoid(self.albedo_head(self._features(means, covs)))
