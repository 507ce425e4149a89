"""Whether a lesion run embeds a scan as the mean of its own embedding and its left-right mirror's
(test-time augmentation): the run's ``mirror.json``, chosen on training patients held out of
training (:mod:`neurocbir.training.mirror_choice`). A tumor's type does not depend on its side,
and the mean of both views is a steadier point than either; a mirrored copy of a case then
embeds exactly where the case does. The tumor map is both views' mean too (the mirror's flipped
back: a steadier outline and decoder peak, measured on held-out slices, docs/results.md
"mirror-map"), so a run whose choice changes has its outline level, region searches and "no tumor"
rule fitted again on it; the descriptor ("unlike the archive", the presence model) stays the scan's own."""

from __future__ import annotations

import json
from pathlib import Path

from neurocbir.errors import ConfigurationError
from neurocbir.files import write_json

FILE = "mirror.json"


def mirrored(run: Path | str) -> bool:
    """Does ``run`` average each scan's embedding with its mirror's? (False without ``mirror.json``.)"""
    path = Path(run) / FILE
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text())["mirror_average"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"{path} is corrupt ({type(exc).__name__}): choose it again with `neurocbir calibrate RUN`"
        ) from None


def save(run: Path | str, mirror_average: bool, how: str, measured: dict) -> None:
    write_json(Path(run) / FILE, {"mirror_average": bool(mirror_average), "how": how, "measured": measured})
