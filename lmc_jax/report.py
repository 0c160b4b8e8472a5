"""`report.html`: one page per run folder that a person opens to see the result.

The page shows the prompt and method, warnings (an empty scene, no surface), an interactive 3D
view of `mesh.glb` with one sentence on the mesh's topology (`mesh_summary`: pieces, floaters
removed, closed or not, Euler number and through-holes), the 360-degree video, the orbit views,
the top view (a torus's hole, or its absence), the fixed views over the training steps
(`grid_<step>.png`), the metrics and links to the files. It works offline from the folder
alone, over `file://`: the viewer (`@google/model-viewer`'s UMD bundle, vendored in
`lmc_jax/assets/viewer` with its licences) is inlined as a classic script, and the GLB is
inlined as base64 and handed to the viewer as a blob URL (Chromium blocks ES modules and `fetch`
of `file://` URLs). Images and the video are linked by relative path.

    python -m lmc_jax.report RUN_FOLDER     # (re)writes RUN_FOLDER/report.html
"""

from __future__ import annotations

import base64
import glob
import html
import json
import os
import re
import sys
from collections.abc import Mapping

from lmc_jax.errors import UserError

VIEWER_JS = os.path.join(os.path.dirname(__file__), "assets", "viewer", "model-viewer-umd.min.js")
VIEWER_SIZE = 420  # pixels, square
BACKGROUND = "#ffffff"

_CSS = f"""
body {{ font-family: sans-serif; margin: 16px; color: #222; background: {BACKGROUND}; }}
h1 {{ font-size: 20px; margin: 0 0 4px 0; }}
h2 {{ font-size: 16px; margin: 20px 0 6px 0; }}
.meta {{ color: #555; margin-bottom: 10px; }}
.warning {{ background: #fff3cd; border: 1px solid #c9a227; padding: 8px; margin: 8px 0; }}
#viewer {{ width: {VIEWER_SIZE}px; height: {VIEWER_SIZE}px; background: {BACKGROUND};
          border: 1px solid #ccc; --poster-color: transparent; }}
.nomesh {{ width: {VIEWER_SIZE}px; padding: 12px; border: 1px solid #ccc; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
img.pixel {{ image-rendering: pixelated; }}
a, a:visited {{ color: #0645ad; }}
figure {{ display: inline-block; margin: 4px; }}
figcaption {{ font-size: 12px; color: #555; }}
"""

# Starts the viewer on the inlined GLB; the page's title ends with "[model loaded]" or
# "[model error]" once the viewer has reported.
_LOADER = """
(function () {
  var data = document.getElementById('glb-data');
  var viewer = document.getElementById('viewer');
  if (!data || !viewer) return;
  var raw = atob(data.textContent.trim());
  var bytes = new Uint8Array(raw.length);
  for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  viewer.addEventListener('load', function () { document.title += ' [model loaded]'; });
  viewer.addEventListener('error', function () { document.title += ' [model error]'; });
  viewer.src = URL.createObjectURL(new Blob([bytes], {type: 'model/gltf-binary'}));
})();
"""


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _get(config: Mapping | None, dotted: str, default=None):
    node = config
    for key in dotted.split("."):
        if node is None:
            return default
        try:
            node = node[key]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def method_line(config: Mapping | None) -> str:
    """'LMC-SDS (w = 7.5) · prior embedded · 300 steps · seed 0' from a run's config."""
    if config is None:
        return ""
    method = _get(config, "guidance.method")
    w = _get(config, "guidance.w")
    names = {"lmc": "LMC-SDS", "sds": "SDS", "csd": "CSD", "nfsd": "NFSD", "dds": "DDS"}
    parts = []
    if method is not None:
        parts.append(names.get(str(method), str(method))
                     + (f" (w = {_fmt(w)})" if w is not None else ""))
    for label, key in (("prior", "prior.name"), ("steps", "steps"), ("seed", "seed")):
        value = _get(config, key)
        if value is not None:
            parts.append(f"{_fmt(value)} {label}" if label == "steps" else f"{label} {value}")
    return " · ".join(parts)


SMALL_IMAGE = 200  # pixels: narrower PNGs are shown enlarged, with sharp pixels


def _img(workdir: str, name: str, alt: str, scale: int = 2) -> str:
    """An <img> of a PNG: a small one (under `SMALL_IMAGE` pixels wide) shown `scale` times
    its size with sharp pixels, a larger one at its size."""
    from PIL import Image

    with Image.open(os.path.join(workdir, name)) as im:
        small = im.width < SMALL_IMAGE
        width = im.width * scale if small else im.width
    cls = ' class="pixel"' if small else ""
    return (f'<img{cls} src="{html.escape(name)}" width="{width}" '
            f'alt="{html.escape(alt)}">')


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# Prompt words for shapes with a through-hole: a genus-0 mesh of such a prompt is said to lack it.
HOLED_SHAPES = ("torus", "ring", "donut", "doughnut")


def mesh_summary(metrics: Mapping, prompt: str = "") -> str:
    """One sentence on the mesh's topology from a run's metrics (`lmc_jax.nerf.export`'s
    `mesh_pieces`, `mesh_watertight`, `mesh_euler`, `mesh_genus`, their `_raw` values before
    the floaters were removed), or '' when the metrics have none.

    Holes are stated from the Euler number of the closed mesh alone (`chi = 2P - 2g` over `P`
    closed pieces): a mesh with genus 0 is said to have no through-hole, whatever the prompt;
    when the `prompt` names a shape with one (`HOLED_SHAPES`), the sentence says it is missing.
    """
    pieces = metrics.get("mesh_pieces")
    if metrics.get("no_surface") or not pieces or "mesh_euler" not in metrics:
        return ""
    text = f"The mesh is {_count(int(pieces), 'piece')}"
    raw = metrics.get("mesh_pieces_raw")
    if raw is not None and raw != pieces:
        fraction = metrics.get("mesh_outlier_fraction")
        under = f" under {100 * fraction:g}% of the faces" if fraction else ""
        text += f" ({_count(int(raw) - int(pieces), 'floater')}{under} removed of {raw})"
    euler = int(metrics["mesh_euler"])
    if metrics.get("mesh_watertight"):
        genus = metrics.get("mesh_genus")
        holes = ("no through-hole" if genus == 0 else
                 f"{_count(int(genus), 'through-hole')}" if genus is not None else "")
        text += f", closed (watertight), Euler number {euler}"
        text += f": {holes} (genus {genus})." if holes else "."
        named = [w for w in HOLED_SHAPES if re.search(rf"\b{w}\b", prompt.lower())]
        if genus == 0 and named:
            text += f" The prompt's {named[0]} has a hole; this mesh has none."
    else:
        text += f", not closed (some edges lack a second face), Euler number {euler}."
    return text


def _grids(workdir: str) -> list[tuple[int, str]]:
    out = []
    for path in glob.glob(os.path.join(workdir, "grid_*.png")):
        m = re.fullmatch(r"grid_(\d+)\.png", os.path.basename(path))
        if m:
            out.append((int(m.group(1)), os.path.basename(path)))
    return sorted(out)


def _viewer_html(workdir: str, glb: str, no_mesh_reason: str) -> tuple[str, str]:
    """(viewer section, scripts) for the page."""
    path = os.path.join(workdir, glb)
    if not os.path.exists(path):
        reason = html.escape(no_mesh_reason or f"{glb} was not written.")
        return f'<div class="nomesh">No 3D model: {reason}</div>', ""
    if not os.path.exists(VIEWER_JS):
        raise UserError(f"the 3D viewer {VIEWER_JS} is missing; reinstall lmc_jax "
                        "(pip install -e .) so its package data is present")
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    with open(VIEWER_JS, encoding="utf-8") as f:
        viewer_js = f.read()
    section = (f'<model-viewer id="viewer" alt="the run\'s mesh ({glb})" camera-controls '
               'interaction-prompt="none" camera-orbit="30deg 70deg auto" '
               'shadow-intensity="0"><div slot="progress-bar"></div></model-viewer>'
               f'<div class="meta">Drag to orbit, scroll to zoom. Files: '
               f'<a href="{html.escape(glb)}">{html.escape(glb)}</a></div>')
    scripts = (f'<script id="glb-data" type="application/octet-stream">{data}</script>\n'
               f"<script>{viewer_js}</script>\n<script>{_LOADER}</script>")
    return section, scripts


def write_viewer_page(workdir: str, path: str, glb: str = "mesh.glb") -> str:
    """A page with the 3D view of `workdir/glb` alone, at the top left (for screenshots);
    returns `path`."""
    viewer, scripts = _viewer_html(workdir, glb, "")
    viewer = viewer.split('<div class="meta">')[0]
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>mesh</title>"
            f"<style>{_CSS} body {{ margin: 0; }} #viewer {{ border: none; }}</style></head>"
            f"<body>{viewer}{scripts}</body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def write_report(workdir: str, metrics: Mapping, config: Mapping | None = None,
                 title: str | None = None, glb: str = "mesh.glb") -> str:
    """Writes `workdir/report.html` for a run and returns its path.

    Args:
      workdir: the run folder (video.mp4 or video.gif, views.png, grid_<step>.png, mesh.glb,
        mesh.obj/.mtl, mesh_albedo.png, mesh.ply, metrics.json, config.json are linked or shown
        when present).
      metrics: the run's metrics (metrics.json); `warnings` (a list of lines) and
        `no_surface_reason` are shown at the top.
      config: the run's config (a ConfigDict or nested dict) for the prompt and method line.
      title: the heading; default the config's prompt.
      glb: the mesh shown in the 3D viewer.
    """
    if not os.path.isdir(workdir):
        raise UserError(f"report: {workdir} is not a folder; pass a run folder")
    prompt = title or _get(config, "prompt") or os.path.basename(os.path.abspath(workdir))
    warnings = [str(w) for w in metrics.get("warnings", []) or []]
    if metrics.get("no_surface"):
        warnings.append("No mesh: " + str(metrics.get("no_surface_reason", "no surface")))
    viewer, scripts = _viewer_html(workdir, glb, str(metrics.get("no_surface_reason", "")))
    body = [f"<h1>{html.escape(str(prompt))}</h1>",
            f'<div class="meta">{html.escape(method_line(config))}</div>']
    body += [f'<div class="warning">{html.escape(w)}</div>' for w in warnings]
    body += ["<h2>3D model</h2>", viewer]
    summary = mesh_summary(metrics, str(prompt))
    if summary:
        body.append(f'<p class="meta">{html.escape(summary)}</p>')
    for name in ("video.mp4", "video.gif"):
        if os.path.exists(os.path.join(workdir, name)):
            body.append("<h2>360-degree video</h2>")
            body.append(f'<video src="{name}" width="384" controls loop autoplay muted></video>'
                        if name.endswith(".mp4") else
                        f'<img class="pixel" src="{name}" width="384" alt="orbit video">')
            break
    if os.path.exists(os.path.join(workdir, "views.png")):
        body += ["<h2>Views</h2>", _img(workdir, "views.png", "orbit views")]
    if os.path.exists(os.path.join(workdir, "view_top.png")):
        body += ["<h2>Top view (camera looking down)</h2>",
                 f"<figure>{_img(workdir, 'view_top.png', 'top view')}<figcaption>"
                 "From straight above: a through-hole shows as background in the middle."
                 "</figcaption></figure>"]
    grids = _grids(workdir)
    if grids:
        body.append("<h2>Fixed views over the training steps</h2>")
        body += [f"<figure>{_img(workdir, name, f'step {step}')}"
                 f"<figcaption>step {step}</figcaption></figure>" for step, name in grids]
    rows = [(k, v) for k, v in metrics.items() if k not in ("warnings",)]
    if rows:
        body.append("<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>")
        body += [f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                 for k, v in rows]
        body.append("</table>")
    files = [n for n in ("mesh.glb", "mesh.obj", "mesh.mtl", "mesh_albedo.png", "mesh.ply",
                         "views.png", "view_top.png", "metrics.json", "config.json")
             if os.path.exists(os.path.join(workdir, n))]
    if files:
        body.append("<h2>Files</h2><p>" + " · ".join(
            f'<a href="{n}">{n}</a>' for n in files) + "</p>")
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(str(prompt))}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n" + scripts + "\n</body></html>\n")
    path = os.path.join(workdir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The path of a Chromium-family browser on PATH, or None."""
    import shutil

    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: str, png: str, size: tuple[int, int] = (800, 900),
               wait_ms: int = 60000, timeout_s: float = 180.0) -> str:
    """Screenshots a local page with headless Chromium (WebGL on SwiftShader, no GPU needed).

    The shot is taken after `wait_ms` of the page's virtual time, which runs ahead whenever
    the page is idle, so it costs little wall time; it must be long, as virtual time does not
    wait for the viewer's off-thread decoding (at 2 s a 400 kB GLB was not shown yet, at 30 s
    it was). Returns `png`.

    Raises:
      UserError: no browser, or the browser wrote no screenshot.
    """
    import subprocess
    import tempfile

    browser = find_browser()
    if browser is None:
        raise UserError("no Chromium found; install one (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
               "--enable-unsafe-swiftshader", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={os.path.abspath(png)}",
               "file://" + os.path.abspath(page)]
        if os.path.exists(png):
            os.remove(png)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    if not os.path.exists(png):
        raise UserError(f"{browser} wrote no screenshot of {page} (exit {proc.returncode}): "
                        f"{proc.stderr.strip().splitlines()[-1:] or ''}")
    return png


def mesh_shot(workdir: str, png: str, glb: str = "mesh.glb") -> str:
    """A [VIEWER_SIZE, VIEWER_SIZE] PNG of the 3D view of `workdir/glb` (headless Chromium).

    The window is larger than the viewer (a viewer filling the window exactly kept Chromium's
    virtual time from ever running out) and the shot is cropped to the viewer.
    """
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        page = write_viewer_page(workdir, os.path.join(tmp, "viewer.html"), glb)
        shot = screenshot(page, os.path.join(tmp, "shot.png"),
                          size=(VIEWER_SIZE + 80, VIEWER_SIZE + 80))
        with Image.open(shot) as im:
            im.convert("RGB").crop((0, 0, VIEWER_SIZE, VIEWER_SIZE)).save(png)
    return png


def main(argv: list[str] | None = None) -> int:
    """`python -m lmc_jax.report RUN_FOLDER`: writes report.html from metrics.json and
    config.json."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise UserError("usage: python -m lmc_jax.report RUN_FOLDER")
        workdir = argv[0]
        loaded = []
        for name in ("metrics.json", "config.json"):
            path = os.path.join(workdir, name)
            if not os.path.exists(path):
                loaded.append({} if name == "metrics.json" else None)
                continue
            with open(path) as f:
                loaded.append(json.load(f))
        print(write_report(workdir, loaded[0], loaded[1]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
