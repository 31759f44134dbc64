"""The build backend: setuptools' own, with ``peft_childtuning_autoload.pth`` added at the root of every wheel.

A file at the root of a wheel is installed into site-packages, where Python runs the ``import`` line of every
``.pth`` file at start-up: that is how an installed peft_childtuning registers itself when peft is imported (see
``peft_childtuning_autoload.py``). setuptools can put no file there, neither in a wheel (``pip install .``) nor in
the editable wheel of ``pip install -e .`` (PEP 660; its ``build_py`` output is left out of that wheel), so both
wheels are completed here, through the PEP 517 hooks and the wheel format only (no setuptools internals): the file
is added and listed in the wheel's RECORD, so that ``pip uninstall`` removes it too.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any, Optional

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook, unchanged)

PTH_FILE = Path(__file__).resolve().parent.parent / "peft_childtuning_autoload.pth"


def build_wheel(
    wheel_directory: str, config_settings: Optional[dict[str, Any]] = None, metadata_directory: Optional[str] = None
) -> str:
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_root_file(os.path.join(wheel_directory, name), PTH_FILE.name, PTH_FILE.read_bytes())
    return name


def build_editable(
    wheel_directory: str, config_settings: Optional[dict[str, Any]] = None, metadata_directory: Optional[str] = None
) -> str:
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_root_file(os.path.join(wheel_directory, name), PTH_FILE.name, PTH_FILE.read_bytes())
    return name


def add_root_file(wheel_path: str, name: str, data: bytes) -> None:
    """Rewrite the wheel at `wheel_path` with the file `name` (holding `data`) at its root, listed in RECORD."""
    with zipfile.ZipFile(wheel_path) as wheel:
        records = [
            info for info in wheel.infolist()
            if info.filename.endswith(".dist-info/RECORD") and info.filename.count("/") == 1
        ]
        if len(records) != 1:
            raise RuntimeError(f"{wheel_path} has {len(records)} .dist-info/RECORD files, not one: not a wheel?")
        record = records[0]
        if name in wheel.namelist():
            raise RuntimeError(f"{wheel_path} already holds {name}.")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
        lines = wheel.read(record).decode("utf-8").splitlines()
        # the RECORD's own line (no hash) stays last
        lines.insert(len(lines) - 1 if lines and lines[-1].startswith(f"{record.filename},") else len(lines),
                     f"{name},sha256={digest},{len(data)}")
        added = zipfile.ZipInfo(name, date_time=record.date_time)  # setuptools' timestamp (SOURCE_DATE_EPOCH)
        added.compress_type = zipfile.ZIP_DEFLATED
        added.external_attr = 0o644 << 16
        rewritten = wheel_path + ".tmp"
        with zipfile.ZipFile(rewritten, "w") as output:
            for info in wheel.infolist():
                if info is not record:
                    output.writestr(info, wheel.read(info))
            output.writestr(added, data)
            output.writestr(record, ("\n".join(lines) + "\n").encode("utf-8"))
    os.replace(rewritten, wheel_path)
