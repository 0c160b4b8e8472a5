"""The automatic b_psi (lmc_jax.bias.auto): cache key, train-once-then-reuse, the off switch."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lmc_jax.bias import auto, train
from lmc_jax.cache import entry_problem
from lmc_jax.config import guidance_config, prior_config
from lmc_jax.data.sources import make_source
from lmc_jax.errors import UserError
from lmc_jax.guidance.from_config import build_guidance
from lmc_jax.priors import gaussian
from lmc_jax.priors.factory import build_prior, config_of

RES = 16
RECIPE = auto.Recipe(num_samples=32, ddim_steps=10, sample_w=0.0, steps=150, batch=8,
                     warmup=10, features=16)


@pytest.fixture(scope="module")
def prior_cfg():
    return prior_config("gaussian", resolution=RES)


@pytest.fixture(scope="module")
def prior(prior_cfg):
    return build_prior(prior_cfg)


@pytest.fixture(scope="module")
def trained(prior, prior_cfg, tmp_path_factory):
    """(cache dir, b_psi folder, printed lines) of the first (training) call."""
    cache = tmp_path_factory.mktemp("cache")
    path = auto.auto_bias(prior, prior_cfg, RECIPE, prompt="", cache_dir=str(cache), quiet=True)
    return cache, path


def _write_folder(root, unet_bytes=b"unet weights"):
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(unet_bytes)
    (root / "unet" / "config.json").write_text("{}")
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "bias").mkdir()
    (root / "bias" / "bias.json").write_text("{}")  # not a weight file


def test_fingerprint_is_sha256_of_the_weight_files_and_follows_their_content(tmp_path):
    folder = tmp_path / "model"
    _write_folder(folder)
    cfg = prior_config("sd", path=str(folder))
    cache = tmp_path / "cache"
    fp = auto.prior_fingerprint(cfg, cache)
    h = hashlib.sha256()  # independent: sorted relative names and content digests
    for rel in ("model_index.json", "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors"):
        h.update(f"{rel}\0{hashlib.sha256((folder / rel).read_bytes()).hexdigest()}\n".encode())
    assert fp == h.hexdigest()
    assert json.loads((cache / "digests.json").read_text())  # digests memoized
    (folder / "bias" / "bias.json").write_text('{"other": 1}')
    assert auto.prior_fingerprint(cfg, cache) == fp  # b_psi/evaluator files are not weights
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet weightz")
    changed = auto.prior_fingerprint(cfg, cache)
    assert changed != fp
    key = auto.cache_key(fp, RECIPE)
    assert auto.cache_key(changed, RECIPE) != key
    assert auto.cache_key(fp, RECIPE.__class__(**{**RECIPE.__dict__, "steps": 151})) != key


def test_samples_source_batches_are_rows_of_the_file(prior, tmp_path):
    xs = np.random.default_rng(0).standard_normal((10, RES, RES, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", xs)
    cfg = ml_collections.ConfigDict({"source": "samples", "path": str(tmp_path / "x.npy")})
    source = make_source(cfg, prior, 4, 0, False, str(tmp_path))
    seen = []
    for step in range(2):  # one epoch: 2 batches of 4 distinct rows
        x, emb = source(step)
        assert x.shape == (4, RES, RES, 3) and emb.shape[0] == 4
        for row in np.asarray(x):
            seen.append(int(np.argmin(np.abs(xs - row).sum(axis=(1, 2, 3)))))
            np.testing.assert_array_equal(row, xs[seen[-1]])
    assert len(set(seen)) == 8


def test_first_call_trains_a_b_psi_close_to_the_exact_deficiency(prior, trained):
    _, path = trained
    meta = json.loads(open(f"{path}/bias.json").read())
    assert meta["training"]["auto"] and meta["training"]["steps"] == RECIPE.steps
    assert meta["training"]["data"] == "prior samples"
    from lmc_jax.bias.store import load_bias

    fn = load_bias(path, prior)[2]
    x = gaussian.sample(prior.params, jax.random.PRNGKey(123), 16)
    emb = prior.embed_text([""] * 16)
    ts = [250, 650]

    def err(f):
        return float(np.mean(list(train.relative_bias_error(f, prior, x, emb, ts).values())))

    # trained on the prior's own DDIM samples only, it is far closer to the closed form b
    assert err(fn) < 0.4 * err(lambda z, t, e: z), (err(fn), err(lambda z, t, e: z))


def test_second_call_reuses_the_cache_without_training(prior, prior_cfg, trained, monkeypatch,
                                                       capsys):
    cache, path = trained
    import lmc_jax.bias.fit as bias_app  # where lmc_jax.bias.auto gets its training

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(bias_app, "train_bias", no_training)
    assert auto.auto_bias(prior, prior_cfg, RECIPE, cache_dir=str(cache)) == path
    assert "reusing" in capsys.readouterr().out
    # through build_guidance: the prior's config is the factory's record (cache from the
    # environment) or the run's config (prior.cache_dir)
    monkeypatch.setattr(auto, "recipe_from_config", lambda p, g: RECIPE)
    monkeypatch.setenv(auto.CACHE_ENV, str(cache))
    gcfg = guidance_config("lmc", bias="learned")
    assert config_of(prior) is not None
    x = jnp.zeros((1, RES, RES, 3))
    _, hp = build_guidance(prior, gcfg)
    assert hp.b_psi(x, jnp.array([500]), prior.embed_text([""])).shape == x.shape
    monkeypatch.delenv(auto.CACHE_ENV)
    run = ml_collections.ConfigDict({"prompt": "anything",
                                     "prior": prior_config("gaussian", resolution=RES,
                                                           cache_dir=str(cache))})
    _, hp = build_guidance(prior, gcfg, run)
    assert hp.b_psi is not None


def test_bias_auto_false_is_the_old_error(prior):
    gcfg = guidance_config("lmc", bias="learned", bias_auto=False)
    with pytest.raises(UserError, match="bias_path=DIR.*bias_auto=False"):
        build_guidance(prior, gcfg)


def test_recipe_overrides_from_config(prior):
    base = auto.default_recipe(prior)
    assert prior.kind == "pixel" and (base.num_samples, base.steps) == (512, 600)
    gcfg = guidance_config("lmc", bias="learned", bias_auto_steps=7, bias_auto_samples=4,
                           bias_auto_ddim_steps=3)
    r = auto.recipe_from_config(prior, gcfg)
    assert (r.steps, r.num_samples, r.ddim_steps, r.batch) == (7, 4, 3, 4)
    assert r.warmup <= 3 and auto.cache_key("w", r) != auto.cache_key("w", base)
    with pytest.raises(UserError, match="must be >= 0"):
        auto.recipe_from_config(prior, guidance_config("lmc", bias_auto_steps=-1))


# --- a damaged cache entry: set aside, trained again, never a traceback -----------------------


@pytest.fixture
def fake_training(prior, trained, monkeypatch):
    """Training replaced by the `trained` fixture's result (counted), and no DDIM sampling:
    what is under test is the cache around it."""
    import lmc_jax.bias.fit as bias_app  # where lmc_jax.bias.auto gets its training
    from lmc_jax.bias.store import load_bias

    module, params, _ = load_bias(trained[1], prior)
    calls = []

    def fake_train(cfg, workdir, prior=None, quiet=False):
        calls.append(workdir)
        return module, params, prior, 0.0

    monkeypatch.setattr(bias_app, "train_bias", fake_train)
    monkeypatch.setattr(auto, "draw_samples", lambda p, ps, r, chunk, quiet=False:
                        np.zeros((r.num_samples, *p.x_shape), np.float32))
    return calls


def _cache_copy(trained, tmp_path):
    """A copy of the trained cache; returns (cache, entry)."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(trained[0], cache)
    entry = cache / "bias" / os.path.basename(trained[1])
    assert (entry / "checksums.json").is_file()
    return cache, entry


def _truncate(f):
    os.truncate(f, f.stat().st_size // 2)


DAMAGES = {
    "truncated params": lambda e: _truncate(e / "params.msgpack"),
    "bias.json removed, folder left": lambda e: (e / "bias.json").unlink(),
    "garbage bias.json": lambda e: (e / "bias.json").write_bytes(os.urandom(64)),
    "no checksums, truncated params": lambda e: ((e / "checksums.json").unlink(),
                                                 _truncate(e / "params.msgpack")),
    "no checksums, garbage bias.json": lambda e: ((e / "checksums.json").unlink(),
                                                  (e / "bias.json").write_text("[1, 2]")),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_entry_is_set_aside_and_trained_again(prior, prior_cfg, trained, fake_training,
                                                      tmp_path, capsys, damage):
    from lmc_jax.bias.store import load_bias

    cache, entry = _cache_copy(trained, tmp_path)
    DAMAGES[damage](entry)
    before = sorted(p.name for p in entry.iterdir())
    path = auto.auto_bias(prior, prior_cfg, RECIPE, cache_dir=str(cache), quiet=True)
    assert path == str(entry) and len(fake_training) == 1
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 1, warnings
    aside = [p for p in entry.parent.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].name.startswith(entry.name + ".damaged-")
    assert aside[0].name in warnings[0] and str(entry) in warnings[0]
    assert sorted(p.name for p in aside[0].iterdir()) == before  # kept as it was, not deleted
    assert entry_problem(entry, cache) is None
    load_bias(path, prior)  # the new entry loads
    # the next run reuses it: no warning, no training
    assert auto.auto_bias(prior, prior_cfg, RECIPE, cache_dir=str(cache), quiet=True) == path
    assert len(fake_training) == 1 and "WARNING" not in capsys.readouterr().err


def test_entry_without_checksums_that_loads_is_reused_and_sealed(prior, prior_cfg, trained,
                                                                 fake_training, tmp_path):
    cache, entry = _cache_copy(trained, tmp_path)
    (entry / "checksums.json").unlink()  # as written before checksums existed
    assert auto.auto_bias(prior, prior_cfg, RECIPE, cache_dir=str(cache)) == str(entry)
    assert not fake_training and (entry / "checksums.json").is_file()
    _truncate(entry / "params.msgpack")  # now the checksum catches what loading would
    assert entry_problem(entry, cache) == "params.msgpack does not match its checksum"


def test_occupied_destination_does_not_lose_the_training(prior, prior_cfg, trained,
                                                         fake_training, tmp_path, monkeypatch,
                                                         capsys):
    """A half-present folder appears at the destination while training (the old OSError
    'Directory not empty'): it is set aside and the finished b_psi moved in."""
    import lmc_jax.bias.fit as bias_app  # where lmc_jax.bias.auto gets its training

    cache = tmp_path / "cache"
    inner = bias_app.train_bias
    key = auto.cache_key(auto.prior_fingerprint(prior_cfg, cache), RECIPE)
    entry = cache / "bias" / key

    def train_then_intrude(cfg, workdir, prior=None, quiet=False):
        entry.mkdir(parents=True)
        (entry / "params.msgpack").write_bytes(b"\x81")  # half-written by someone else
        return inner(cfg, workdir, prior=prior, quiet=quiet)

    monkeypatch.setattr(bias_app, "train_bias", train_then_intrude)
    assert auto.auto_bias(prior, prior_cfg, RECIPE, cache_dir=str(cache)) == str(entry)
    assert entry_problem(entry, cache) is None
    assert not (entry.parent / (key + ".partial")).exists()
    assert [p.name for p in entry.parent.iterdir() if ".tmp" in p.name] == []
    assert capsys.readouterr().err.count("WARNING") == 1


def test_damaged_entry_that_cannot_be_moved_is_one_error_naming_it(prior, prior_cfg, trained,
                                                                   fake_training, tmp_path,
                                                                   monkeypatch):
    cache, entry = _cache_copy(trained, tmp_path)
    _truncate(entry / "params.msgpack")

    def refuse(folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(auto, "set_aside", refuse)
    with pytest.raises(UserError, match=f"delete the folder {entry} and run again"):
        auto.auto_bias(prior, prior_cfg, RECIPE, cache_dir=str(cache))
    assert not fake_training


def test_runs_at_once_on_an_empty_cache_train_once(prior, prior_cfg, fake_training, tmp_path):
    import threading
    import time

    import lmc_jax.bias.fit as bias_app  # where lmc_jax.bias.auto gets its training

    inner = bias_app.train_bias

    def slow(*a, **k):
        time.sleep(0.5)
        return inner(*a, **k)

    bias_app.train_bias = slow
    try:
        out = []
        runs = [threading.Thread(target=lambda: out.append(auto.auto_bias(
            prior, prior_cfg, RECIPE, cache_dir=str(tmp_path / "cache"), quiet=True)))
            for _ in range(3)]
        for r in runs:
            r.start()
        for r in runs:
            r.join()
    finally:
        bias_app.train_bias = inner
    assert len(out) == 3 and len(set(out)) == 1 and len(fake_training) == 1
