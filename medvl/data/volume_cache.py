"""An on-disk cache of preprocessed volumes, shared by DataLoader workers, ranks and later runs.

    cache = VolumeCache("~/.cache/medvl/volumes")
    key = cache.key_for("/data/ct/scan1.nii.gz", "ct_transforms size=(64, 64, 32) spacing=...")
    entry = cache.get(key)                       # None on a miss, else {"volume": tensor, ...}
    if entry is None:
        cache.put(key, {"volume": volume, "affine": affine})

Each entry is one safetensors file (``<root>/<key[:2]>/<key>.safetensors``) holding named tensors,
so nothing on disk is ever unpickled and an entry reads back with the dtype, shape and values it was
written with. The key is the sha256 of the source's absolute path, its size and mtime (for a folder,
such as a DICOM series: the names, sizes and mtimes of the files directly inside) and a description of
the transform: an edited source or a changed transform gets a new key, so stale entries are never read
(they are only left behind; delete the folder to reclaim the space).

Writes go to a temporary file in the entry's folder and are renamed into place (``os.replace`` is atomic
on one file system), so concurrent writers of one key each write a complete file and the last rename
wins, and a reader never sees half an entry. The object holds only its root path: it pickles cheaply
into DataLoader workers and keeps no file open.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Dict, Mapping, Optional, Union

import torch

__all__ = ["VolumeCache", "source_fingerprint"]

PathLike = Union[str, os.PathLike]

_SUFFIX = ".safetensors"


def source_fingerprint(path: PathLike) -> str:
    """The absolute path, size and mtime of a file, or of the files directly inside a folder, as text.

    Raises FileNotFoundError when the path does not exist (a key cannot vouch for a missing source).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"cannot key a cache entry on a missing source: {path}")
    if os.path.isdir(path):
        # A DICOM series is a folder: editing one slice in place leaves the folder's own mtime alone,
        # so fingerprint every file in it.
        parts = []
        for name in sorted(os.listdir(path)):
            st = os.stat(os.path.join(path, name))
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        return f"dir:{path}|" + "|".join(parts)
    st = os.stat(path)
    return f"file:{path}|{st.st_size}|{st.st_mtime_ns}"


class VolumeCache:
    """Preprocessed volumes on disk, keyed by source file and transform (see the module docstring).

    Args:
        root: the cache folder; created on the first write.
    """

    def __init__(self, root: PathLike) -> None:
        if root is None or not os.fspath(root):
            raise ValueError("VolumeCache needs a folder (root), got an empty path")
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NotADirectoryError(f"cache_dir {self.root} exists and is not a folder; pass a folder path")

    def __repr__(self) -> str:
        return f"VolumeCache({self.root!r})"

    @staticmethod
    def key_for(path: PathLike, transform_description: str) -> str:
        """sha256 hex digest of the source's fingerprint (path, size, mtime) and the transform description.

        ``transform_description`` must name every parameter that changes the stored tensor (pipeline,
        size, spacing, window, orientation, loader...) as a stable string; see ``medvl.data.sources``.
        """
        if not isinstance(transform_description, str):
            raise TypeError(f"transform_description must be a str, got {type(transform_description).__name__}")
        text = source_fingerprint(path) + "\n" + transform_description
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path_for(self, key: str) -> str:
        """Where the entry of ``key`` lives (whether or not it exists)."""
        if not isinstance(key, str) or len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a lowercase hex digest (from key_for), got {key!r}")
        # Two-character fan-out keeps folders small for datasets of tens of thousands of volumes.
        return os.path.join(self.root, key[:2], key + _SUFFIX)

    def __contains__(self, key: str) -> bool:
        return os.path.isfile(self.path_for(key))

    def get(self, key: str) -> Optional[Dict[str, torch.Tensor]]:
        """The tensors stored under ``key``, or None when there is no (readable) entry.

        An unreadable entry (say, a file damaged by a full disk) counts as a miss: the caller
        recomputes it and ``put`` replaces it.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path_for(key)
        try:
            return load_file(path)
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError):
            return None

    def put(self, key: str, tensors: Union[torch.Tensor, Mapping[str, torch.Tensor]],
            description: Optional[str] = None) -> str:
        """Store ``tensors`` (one tensor is stored as ``{"volume": tensor}``) under ``key``; returns the path.

        ``description`` (e.g. the source path and transform) goes into the file's header, to make a
        cache folder inspectable; it plays no part in lookups.
        """
        from safetensors.torch import save_file

        if isinstance(tensors, torch.Tensor):
            tensors = {"volume": tensors}
        if not isinstance(tensors, Mapping) or not tensors:
            raise TypeError("put takes a tensor or a non-empty dict of name -> tensor")
        plain = {}
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"put: {name!r} must be a tensor, got {type(value).__name__}")
            if hasattr(value, "as_tensor"):  # MetaTensor: store the data, not its meta dict
                value = value.as_tensor()
            # safetensors refuses views and shared storage; a private contiguous CPU copy is always accepted
            plain[str(name)] = value.detach().to("cpu").contiguous().clone()
        path = self.path_for(key)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + key[:16] + "-", suffix=_SUFFIX, dir=folder)
        os.close(fd)
        try:
            save_file(plain, tmp, metadata=None if description is None else {"description": str(description)})
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path
