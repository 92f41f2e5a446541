#!/usr/bin/env python3
"""Bundle the pages' browser libraries into the package: `python web/bundle.py`.

`npm ci` installs the versions pinned in web/package-lock.json from the npm
registry, then their prebuilt browser files are copied into
tilemask/serve/static/vendor/ (ignored by git, shipped in the wheel), with
their licences. `tilemask serve` serves them itself: the pages load nothing
from a CDN, since users run air-gapped. Run it once after cloning (the README's
install command does); it does nothing when the files are already there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

WEB = Path(__file__).resolve().parent
VENDOR = WEB.parent / "tilemask" / "serve" / "static" / "vendor"
FILES = {  # copied from node_modules -> name in vendor/
    "ol/dist/ol.js": "ol.js",
    "ol/ol.css": "ol.css",
    "ol/LICENSE.md": "LICENSE-ol.md",
    "@niivue/niivue/dist/niivue.umd.js": "niivue.umd.js",
    "@niivue/niivue/package.json": "niivue-package.json",  # no LICENSE file in the package; its package.json says BSD-2-Clause
}


def main(force: bool = False) -> int:
    if not force and all((VENDOR / name).is_file() for name in FILES.values()):
        return 0
    npm = shutil.which("npm")
    if npm is None:
        print(
            "bundle.py: npm is not installed (Node.js 18+ with npm is needed once, to bundle the pages)",
            file=sys.stderr,
        )
        return 1
    subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--omit=dev"], cwd=WEB, check=True)
    VENDOR.mkdir(parents=True, exist_ok=True)
    for source, name in FILES.items():
        shutil.copyfile(WEB / "node_modules" / source, VENDOR / name)
    print(f"bundle.py: {len(FILES)} files in {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(force="--force" in sys.argv))
