"""The manifold testbed (configs/testbed.py:manifold) against properties of its exact prior."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import testbed as testbed_config
from lmc_jax.apps import manifold
from lmc_jax.apps.testbed import high_frequency_energy
from lmc_jax.priors import gaussian

RES = 16


def _prior():
    return gaussian.gaussian_prior(resolution=RES, variance=0.02,
                                   classes=gaussian.pattern_classes(RES))


def test_starts_are_off_the_manifold_in_the_stated_ways():
    prior = _prior()
    x0, labels, kinds = manifold.make_starts(prior, jax.random.PRNGKey(0), 3.0, 0.5)
    k = len(gaussian.pattern_classes(RES))
    assert x0.shape == (4 * k, RES, RES, 3)
    np.testing.assert_array_equal(labels, np.tile(np.arange(k), 4))
    data = gaussian.sample(prior.params, jax.random.PRNGKey(1), 64)
    hf = high_frequency_energy(x0, 0.0, 4.0)
    data_hf = float(jnp.mean(high_frequency_energy(data, 0.0, 4.0)))
    assert float(hf[kinds == 0].max()) < 0.5 * data_hf  # blurred: detail gone
    assert float(hf[kinds == 0].mean()) < 0.2 * data_hf
    logp = gaussian.log_density(prior.params, x0) / x0[0].size
    data_logp = float(jnp.mean(gaussian.log_density(prior.params, data))) / x0[0].size
    for kind in range(4):  # every kind of start is far less likely than data
        assert float(logp[kinds == kind].mean()) < data_logp - 1.0, manifold.STARTS[kind]


def test_result_metrics_on_data_and_on_a_shifted_class():
    prior = _prior()
    k = len(gaussian.pattern_classes(RES))
    labels = np.arange(k)
    means = gaussian.class_means(prior.params)
    m = manifold.result_metrics(prior, means, means + 0.1, labels, 1.0, 4.0)
    np.testing.assert_allclose(m["dist"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["moved"], 0.1, rtol=1e-5)
    assert m["acc"].all()
    m = manifold.result_metrics(prior, means, means, (labels + 1) % k, 1.0, 4.0)
    assert not m["acc"].any()


def test_manifold_preset_runs_and_csd_at_w0_does_not_move(tmp_path):
    config = testbed_config.get_config("manifold_quick")
    config.prior.resolution = RES
    config.steps = 2
    config.manifold.settings = ("w0",)  # 4 compiled runs, not 10
    out = manifold.run(config, str(tmp_path))
    runs = {(r["setting"], r["method"]): r for r in out["runs"]}
    assert runs[("w0", "csd")]["moved"] == 0.0  # CSD at w = 0 has no gradient at all
    assert runs[("w0", "sds")]["moved"] > 0.0
    assert ("wlow", "sds") not in runs
    assert (tmp_path / "manifold.png").exists() and (tmp_path / "metrics.json").exists()
