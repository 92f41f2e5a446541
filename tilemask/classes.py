"""Class names and colours: one convention for every format, the quick look and the viewers."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

ClassNames = Sequence[str] | Mapping[int, str]
"""Names of label values: a sequence names 0, 1, 2, ...; a mapping (a colour table's, whose values may be sparse)
names its keys only."""

CLASSES_TAG = "TILEMASK_CLASSES"
"""GeoTIFF dataset tag holding the class names as a JSON list."""


def class_name(names: ClassNames | None, value: int) -> str:
    """The name of label ``value``: ``names[value]``, else ``class_<value>``."""
    names = names or ()
    if isinstance(names, Mapping):
        return str(names[value]) if value in names else f"class_{value}"
    return str(names[value]) if 0 <= value < len(names) else f"class_{value}"


def named_values(names: ClassNames | None) -> list[int]:
    """The label values ``names`` names, ascending."""
    return sorted(names) if isinstance(names, Mapping) else list(range(len(names or ())))


def class_count(names: ClassNames | None) -> int:
    """One more than the largest value ``names`` names: the classes 0, 1, ... they reach."""
    return max(names) + 1 if isinstance(names, Mapping) and names else len(names or ())


def probability_class(names: ClassNames | None, channels: int, channel: int) -> int:
    """The class whose probability is ``channel`` of ``channels`` probability channels: its own, but a sigmoid's one
    channel, of classes ``[background, foreground]``, is the foreground's (1)."""
    return 1 if channels == 1 and class_count(names) == 2 else channel


# A qualitative palette (Tableau 10, then Tableau 20's light tones); class 0 is background.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip
BACKGROUND = (0, 0, 0, 0)


def class_colours(n_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """RGBA per class: background transparent, the others from :data:`PALETTE` (cycled)."""
    colours = {0: BACKGROUND}
    for value in range(1, n_classes):
        colours[value] = (*PALETTE[(value - 1) % len(PALETTE)], 255)
    return colours


CYCLE = class_colours(len(PALETTE) + 1)  # class_colours cycles through the palette: these are all its colours


def cycled(value):
    """The class in :data:`CYCLE` whose colour label ``value`` (an int or an array) has."""
    import numpy as np

    return np.where(value > 0, (value - 1) % len(PALETTE) + 1, 0)


COLOUR_TABLE_COLUMNS = ("LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A")
"""3D Slicer's colour table CSV format: what Slicer loads as a colour table for a label volume."""


def write_colour_table(path, names: tuple[str, ...] | list[str]) -> None:
    """Class names and colours as a 3D Slicer colour table (CSV), background (0) included with alpha 0."""
    import csv

    colours = class_colours(max(len(names), 2))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLOUR_TABLE_COLUMNS)
        for value, name in enumerate(names):
            # Slicer's reader cannot take quotation marks inside a value
            writer.writerow((value, str(name).replace('"', "'"), *colours[value]))


def read_colour_table(path) -> ClassNames | None:
    """The class names of a colour table such as :func:`write_colour_table` writes: a tuple when its values are 0 to
    n - 1, else a mapping of the values it names (a table naming label 3e8 holds one name, not 3e8).

    None when there is no table; a table that cannot be read as one is left out with a warning that says why, and
    a value named twice is refused (3D Slicer's format does not say which name would hold).
    """
    import csv

    from .errors import InputError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO: opening it waits for a writer, forever
            return _left_out(path, "not a file")
        with open(path, newline="", encoding="utf-8-sig") as f:  # UTF-8, with or without Excel's byte order mark
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return _left_out(path, str(exc))
    try:
        pairs = [(int(row["LabelValue"]), row["Name"]) for row in rows]
    except (KeyError, TypeError, ValueError) as exc:
        return _left_out(path, f"not a row of an integer LabelValue and a Name: {exc}")
    named: dict[int, str] = {}
    for value, name in pairs:
        if value in named:
            raise InputError(f"{path}: label {value} is named twice ({named[value]!r} and {name!r})")
        named[value] = name
    if not named or min(named) < 0:
        return _left_out(path, "it names no label" if not named else f"label {min(named)} is negative")
    named = dict(sorted(named.items()))
    return tuple(named.values()) if max(named) == len(named) - 1 else named


def _left_out(path, why: str) -> None:
    logger.warning("%s: class names left out (%s): the labels are named class_<value>", path, why)
