"""The errors of the real-dataset pipeline: download -> verify -> extract -> convert.

Each message says what is wrong, which file, and what to do; ``data_scripts/download.py``
maps each class to its own exit code.
"""
from __future__ import annotations


class DownloadError(RuntimeError):
    """A dataset could not be fetched or prepared; the message says what to do."""


class ChecksumError(DownloadError):
    """An archive's sha256 differs from the catalogue, or no checksum is known."""


class UnsafeArchiveError(DownloadError):
    """An archive holds something other than plain files and folders, or is a size bomb."""


class LayoutError(DownloadError):
    """The extracted/converted folder is not in the expected (MVTec) layout."""
