"""Videos of a field's views: MP4 (H.264, yuv420p) via imageio-ffmpeg, a GIF fallback."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from lmc_jax.errors import UserError
from lmc_jax.nerf.texture import to_uint8

_LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_fork():
    """imageio-ffmpeg starts ffmpeg with fork+exec, which is safe, but JAX warns on any fork."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        yield


def _mp4_ok(path, num_frames):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return False
    import imageio.v2 as iio

    try:
        with _quiet_fork(), iio.get_reader(path) as reader:
            return reader.count_frames() == num_frames
    except Exception:  # noqa: BLE001 - any reader failure means the file is unusable
        return False


def write_video(path, frames, fps=30):
    """Writes frames [N, H, W, 3] (uint8, or float in [0, 1]) as an MP4 (H.264, yuv420p).

    If the MP4 cannot be written or read back (no ffmpeg, or odd H/W, which yuv420p rejects)
    a GIF is written instead, next to `path` with the suffix `.gif`.

    Returns:
      the path actually written.
    """
    import imageio.v2 as iio

    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"write_video expects frames [N, H, W, 3], got {frames.shape}")
    try:
        with _quiet_fork(), iio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1,
                                           pixelformat="yuv420p",
                                           ffmpeg_log_level="quiet") as writer:
            for frame in frames:
                writer.append_data(frame)
        if _mp4_ok(path, len(frames)):
            return path
    except Exception as err:  # noqa: BLE001 - fall back on any ffmpeg failure
        _LOG.warning("MP4 writing failed (%s); writing a GIF instead", err)
    if os.path.exists(path):
        os.remove(path)
    gif_path = os.path.splitext(path)[0] + ".gif"
    iio.mimsave(gif_path, list(frames), duration=1000.0 / fps, loop=0)
    return gif_path
