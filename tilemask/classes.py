"""Class names and colours: one convention for every format, the quick look and the viewers."""

from __future__ import annotations

CLASSES_TAG = "TILEMASK_CLASSES"
"""GeoTIFF dataset tag holding the class names as a JSON list."""


def class_name(names: tuple[str, ...] | list[str] | None, value: int) -> str:
    """The name of label ``value``: ``names[value]``, else ``class_<value>``."""
    names = names or ()
    return str(names[value]) if 0 <= value < len(names) else f"class_{value}"


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
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLOUR_TABLE_COLUMNS)
        for value, name in enumerate(names):
            # Slicer's reader cannot take quotation marks inside a value
            writer.writerow((value, str(name).replace('"', "'"), *colours[value]))


def read_colour_table(path) -> tuple[str, ...] | None:
    """The class names of a colour table written by :func:`write_colour_table` (gaps named ``class_<v>``)."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    try:
        named = {int(row["LabelValue"]): row["Name"] for row in rows}
    except (KeyError, TypeError, ValueError):
        return None
    if not named or min(named) < 0:
        return None
    return tuple(named.get(v, f"class_{v}") for v in range(max(named) + 1))
