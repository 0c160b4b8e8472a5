"""report.html: contents, offline assets, and the 3D view in a real headless browser."""

import base64
import colorsys
import html.parser
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lmc_jax import report
from lmc_jax.errors import UserError
from lmc_jax.nerf import export

PURPLE = (0.55, 0.15, 0.8)
CONFIG = {"prompt": "a purple sphere", "steps": 300, "seed": 0, "prior": {"name": "embedded"},
          "guidance": {"method": "lmc", "w": 7.5}}
METRICS = {"eval_accuracy": 0.875, "opaque_fraction": 0.1234567, "empty_scene": False}


def _ball(x):
    return 30.0 * jnp.maximum(1.0 - jnp.linalg.norm(x, axis=-1) / 0.5, 0.0)


def _purple(x):
    return jnp.broadcast_to(jnp.asarray(PURPLE, jnp.float32), x.shape)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as t23d leaves it: a purple ball's assets, grey views and grids."""
    workdir = tmp_path_factory.mktemp("run")
    out = export.write_assets(str(workdir), _ball, _purple, 24, 1.0, texture_size=64)
    grey = np.full((16, 16, 3), 128, np.uint8)
    for name in ("views.png", "grid_000200.png", "grid_000100.png", "grid_001000.png"):
        Image.fromarray(grey).save(workdir / name)
    path = report.write_report(str(workdir), {**METRICS, **out}, CONFIG)
    return workdir, path


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag

    def handle_data(self, data):
        if self._in not in ("script", "style"):
            self.text.append(data)


def _parse(path):
    parser = _Tags()
    parser.feed(path.read_text() if hasattr(path, "read_text") else open(path).read())
    return parser.tags, " ".join(parser.text)


def test_report_shows_the_run_and_needs_nothing_outside_the_folder(run_folder):
    workdir, path = run_folder
    tags, text = _parse(workdir / "report.html")
    assert "a purple sphere" in text and "LMC-SDS (w = 7.5)" in text and "300 steps" in text
    assert "0.1235" in text and "0.875" in text  # metrics, 4 significant digits
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert imgs == ["views.png", "grid_000100.png", "grid_000200.png", "grid_001000.png"]
    links = {a["href"] for t, a in tags if t == "a"}
    assert {"mesh.glb", "mesh.obj", "mesh.mtl", "mesh_albedo.png", "mesh.ply"} <= links
    # Every reference is a file in the folder (no network, nothing outside it).
    for ref in imgs + sorted(links):
        assert (workdir / ref).exists(), ref
    assert not [a for t, a in tags if t == "script" and "src" in a]
    page = (workdir / "report.html").read_text()
    start = page.index('id="glb-data" type="application/octet-stream">') + 46
    glb = base64.b64decode(page[start:page.index("</script>", start)])
    assert glb == (workdir / "mesh.glb").read_bytes()
    with open(report.VIEWER_JS) as f:
        assert f.read(200) in page  # the vendored viewer, inlined


def test_report_states_the_meshs_topology_and_shows_the_top_view(run_folder, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(run_folder[0], workdir)
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(workdir / "view_top.png")
    ball = {"mesh_pieces": 1, "mesh_pieces_raw": 4, "mesh_outlier_fraction": 0.01,
            "mesh_watertight": True, "mesh_euler": 2, "mesh_genus": 0}
    report.write_report(str(workdir), {**METRICS, **ball}, CONFIG)
    tags, text = _parse(workdir / "report.html")
    said = ("The mesh is 1 piece (3 floaters under 1% of the faces removed of 4), closed "
            "(watertight), Euler number 2: no through-hole (genus 0).")
    assert said in text and "Top view (camera looking down)" in text
    top = [a for t, a in tags if t == "img" and a["src"] == "view_top.png"]
    assert top and top[0]["width"] == "256" and "class" not in top[0]  # shown at its size
    assert report.mesh_summary({"mesh_pieces": 1, "mesh_pieces_raw": 1, "mesh_euler": 0,
                                "mesh_watertight": True, "mesh_genus": 1}).endswith(
        "Euler number 0: 1 through-hole (genus 1).")
    assert report.mesh_summary({"mesh_pieces": 2, "mesh_euler": 3,
                                "mesh_watertight": False}) == (
        "The mesh is 2 pieces, not closed (some edges lack a second face), Euler number 3.")
    torus = {"mesh_pieces": 1, "mesh_euler": 2, "mesh_watertight": True, "mesh_genus": 0}
    assert report.mesh_summary(torus, "a green torus").endswith(
        "no through-hole (genus 0). The prompt's torus has a hole; this mesh has none.")
    assert "prompt" not in report.mesh_summary(torus, "a red string")  # 'ring' as a word only
    assert report.mesh_summary({"no_surface": True, "mesh_pieces": 0}) == ""
    assert "through-hole" not in report.mesh_summary({"mesh_pieces": 1, "mesh_euler": 2})


def test_report_without_a_mesh_says_why(tmp_path):
    empty = export.write_assets(str(tmp_path), lambda x: 0.0 * x[:, 0], _purple, 8, 1.0)
    warning = "EMPTY SCENE: 0.00% of the evaluation views' pixels are opaque"
    report.write_report(str(tmp_path), {**empty, "warnings": [warning]}, CONFIG)
    tags, text = _parse(tmp_path / "report.html")
    assert warning in text and "No 3D model: no surface: no ray" in text
    assert not [t for t, _ in tags if t == "model-viewer"]
    assert "glb-data" not in (tmp_path / "report.html").read_text()
    with pytest.raises(UserError, match="not a folder"):
        report.write_report(str(tmp_path / "missing"), {}, CONFIG)


def _hue_match(pixels, rgb, tol_deg=20.0):
    """Pixels (uint8 [N, 3]) of the hue of `rgb` and saturated (not grey/white/black)."""
    hsv = np.asarray([colorsys.rgb_to_hsv(*p) for p in pixels / 255.0])
    hue = colorsys.rgb_to_hsv(*rgb)[0]
    dist = np.abs((hsv[:, 0] - hue + 0.5) % 1.0 - 0.5) * 360.0
    return (dist < tol_deg) & (hsv[:, 1] > 0.4) & (hsv[:, 2] > 0.2)


@pytest.mark.skipif(report.find_browser() is None,
                    reason="no Chromium on PATH (Debian: apt-get install -y chromium; CI "
                           "installs it)")
def test_report_3d_view_shows_the_model_in_headless_chromium(run_folder, tmp_path):
    workdir, path = run_folder
    start = time.time()
    shot = report.screenshot(path, str(tmp_path / "shot.png"), size=(600, 700))
    seconds = time.time() - start
    image = np.asarray(Image.open(shot).convert("RGB"))
    # Nothing on the page but the 3D view is purple (the views and grids are grey).
    pixels = image.reshape(-1, 3)
    purple = _hue_match(pixels, PURPLE)
    assert purple.sum() > 0.05 * report.VIEWER_SIZE**2, (purple.sum(), seconds)
    ys, xs = np.nonzero(purple.reshape(image.shape[:2]))
    # One blob about as wide as tall (a ball), inside the viewer's square.
    height, width = ys.max() - ys.min(), xs.max() - xs.min()
    assert 0.8 < height / width < 1.25 and width < report.VIEWER_SIZE


def test_prompt_benchmark_counts_a_visible_object_without_a_glb_and_draws_the_figure(
        run_folder, tmp_path, monkeypatch):
    import json
    import shutil

    from _bench import load_benchmark

    bench = load_benchmark("t23d_prompts")
    workdir, _ = run_folder
    runs = {"a purple sphere": True, "a red cube": False}  # has a GLB
    for prompt, glb in runs.items():
        wd = tmp_path / "lmc" / prompt.replace(" ", "_")
        wd.mkdir(parents=True)
        Image.fromarray(np.full((10, 30, 3), 128, np.uint8)).save(wd / "views.png")
        (wd / "metrics.json").write_text(json.dumps({"mesh_faces": 860 if glb else 0}))
        if glb:
            shutil.copy(workdir / "mesh.glb", wd / "mesh.glb")
    results = {"lmc": {"a purple sphere": {"empty_scene": False},
                       "a red cube": {"empty_scene": False},
                       "a blue cone": {"empty_scene": True}}}  # empty: no mesh expected
    assert bench.missing_meshes(str(tmp_path), results) == {"lmc": ["a red cube"]}
    monkeypatch.setattr(report, "find_browser", lambda: None)  # text only (no mesh shots)
    bench.labelled_views(str(tmp_path), ["lmc"], list(runs), str(tmp_path / "fig.png"))
    fig = np.asarray(Image.open(tmp_path / "fig.png"))
    assert fig.shape == (2 * 20, 170 + 60 + 20, 3)
    np.testing.assert_array_equal(fig[:, 170:230], 128)  # both rows' views, 2x


def test_report_command_rewrites_the_page_from_the_folder(run_folder, tmp_path, capsys):
    import json
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(run_folder[0], workdir)
    (workdir / "metrics.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    (workdir / "config.json").write_text(json.dumps(CONFIG))
    assert report.main([str(workdir)]) == 0
    _, text = _parse(workdir / "report.html")
    assert "a purple sphere" in text and "0.5" in text and "0.875" not in text
    assert report.main([]) == 2
    assert capsys.readouterr().err.startswith("error: usage: python -m lmc_jax.report")
