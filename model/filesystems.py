"""Locations the model registry and the training job accept: a local path or any URI pyarrow's
filesystem layer understands (file://, s3://, gs://, hdfs://...)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def split_uri(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a URI; a URI pyarrow cannot open is a ValueError
    that names it."""
    text = str(location)
    if "://" not in text:
        return pafs.LocalFileSystem(), Path(text).expanduser().resolve().as_posix()
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{text!r}: {error}") from None
    return fs, path.rstrip("/") or "/"
