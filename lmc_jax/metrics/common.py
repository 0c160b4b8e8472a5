"""What the metric loaders share: the record of a metric that cannot be computed.

Metric weights (CLIP, LPIPS) are optional: a run without them must still finish and say why a
figure is missing. A loader therefore returns either the model or an `Unavailable(name, reason)`,
never raises for a missing or unreadable file, and an app writes `str(u)` into metrics.json:

    clip = load_clip(path)
    out["clip_score"] = str(clip) if isinstance(clip, Unavailable) else float(score.mean())

which gives `{"clip_score": "unavailable: <reason>"}`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """A metric that cannot be computed here: `name` ('clip', 'lpips') and a one-line `reason`."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"unavailable: {self.reason}"


def first_line(e: BaseException) -> str:
    """'TypeName: first line of the message', for reasons that fit on one line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
