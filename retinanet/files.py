"""Writing user-visible files safely: atomic replacement and up-front checks.

Every file the toolkit writes (checkpoints, detections, ONNX models, calibration
tables, engines, their metadata, timing caches) goes through `atomic_write`, so
that an interrupted or failed run leaves either the old file or the new one,
never a truncated one. `check_output` runs before any work, so a bad output
path is found in a second rather than after an hour of inference or export.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

from .errors import UserError

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on success it is fsynced and renamed over `path`.

    The temp file lives in the same folder (a rename across file systems is not
    atomic) and is removed if the body raises, including KeyboardInterrupt.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    remove_orphans(folder, prefix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(folder)


def remove_orphans(folder: str, prefix: str) -> None:
    """Temp files of the same target left by a killed run (SIGKILL, power loss):
    nothing else writes files with our prefix there, so they are garbage."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output(path: str, override: bool, what: str = "output file", flag: str = "--override") -> None:
    """Before any work: `path` may be written (its folder exists and is writable) and
    does not hold a file the user did not ask us to replace."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; give a file name for the {what}")
    if os.path.exists(path) and not override:
        raise UserError(f"{path}: {what} exists; pass {flag} to replace it or choose another name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: folder {folder} does not exist")
    try:  # a real probe: os.access says yes to root even on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".retinanet-probe.", dir=folder)
    except OSError as e:
        raise UserError(f"{path}: folder {folder} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def load_tensors(path: str, what: str):
    """torch.load with weights_only=True: tensors, numbers, strings and containers
    only, so that a file someone sent cannot run code when opened (everything
    this toolkit saves loads this way). UserError naming `path` otherwise."""
    import pickle
    import warnings
    import zipfile

    import torch

    if not os.path.isfile(path):
        raise UserError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickle protocols: the error below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):  # a real torch.save file whose pickle names other classes
            raise UserError(
                f"{path}: refusing to load this {what}: it holds Python objects beyond tensors "
                f"and plain containers, and unpickling them could run code; re-save its tensors "
                f"(state_dict) alone"
            ) from None
        raise UserError(f"{path}: not a readable {what} (not a torch.save file, or a truncated one)") from None
    except Exception as e:  # noqa: BLE001 - zip and unpickling errors of a damaged or foreign file
        # Only the zip reader's messages say something; the unpickler's are bare keys and opcodes.
        detail = ": " + " ".join(str(e).split()).split(". ")[0] if isinstance(e, RuntimeError) else ""
        raise UserError(f"{path}: not a readable {what} (not a torch.save file, or a truncated one{detail})") from None
