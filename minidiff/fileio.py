"""Atomic file writes: a crash or a full disk never leaves a half-written file where a good one was.

A file is written to a temporary name in the same folder, flushed and fsynced, then renamed over the target with
``os.replace`` (atomic on POSIX and Windows); on any failure the temporary file is removed and the target is exactly
as it was. The same approach as the training checkpoints (``minidiff/training/checkpoint.py``), for single files.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import IO, Callable

import PIL.Image

# what ``save_image`` writes: extension -> PIL format (each writes an RGB image with the stock Pillow)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


def fsync_dir(folder: str) -> None:
    """Make a rename inside ``folder`` durable; best effort (Windows and some file systems cannot fsync a folder)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync it, and rename it to ``path``.

    An ``OSError`` (no space left, permission denied, ...) is re-raised as one ``OSError`` whose message names
    ``path`` and says the existing file is untouched; the original error is its ``__cause__`` (with ``errno``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    name, tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp"), None
    try:
        descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        tmp = name
        with os.fdopen(descriptor, "wb") as handle:
            if existed:
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # a replaced file keeps its permissions
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        kept = "the existing file is untouched" if existed else "nothing was written"
        raise OSError(f"{reason} writing {path}; {kept}") from error
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    fsync_dir(folder)


def save_image(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    """Write ``image`` atomically, in the format its extension names (one of ``IMAGE_FORMATS``)."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension not in IMAGE_FORMATS:
        raise ValueError(f"cannot write an image to {path}: use one of the extensions {sorted(IMAGE_FORMATS)}")
    atomic_write(path, lambda handle: image.save(handle, format=IMAGE_FORMATS[extension]))
