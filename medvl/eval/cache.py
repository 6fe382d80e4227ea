"""Encode each volume and each text once per model, and reuse the result in every evaluation task.

    encoder = CachedEncoder(model, EmbeddingCache("runs/siglip/eval/cache", checkpoint_hash(path)))
    volumes = encoder.encode_volumes(dataset, volume_ids(dataset, "synthetic-ct", (64, 64, 32)))
    texts = encoder.encode_texts(["Pleural effusion is present.", ...])      # (M, D), L2-normalised

What is stored, per item, is the model's raw output (no task-specific projection), so one entry
serves every task:

* a volume: ``image_features`` (D,) normalised, ``pooled`` (W,) the pooled tower output before the
  projection, ``depth`` (n_z, W) the per-depth features before the projection;
* a text: ``features`` (D,) normalised.

Keys:

* the model: ``checkpoint_hash`` (sha256 of ``model.safetensors``) for a checkpoint on disk, or
  :func:`model_fingerprint` (sha256 over the state dict) for a model in memory. Each model gets its
  own sub-folder, so entries of different weights never mix.
* a volume: sha256 of a JSON descriptor holding the dataset source, the sample's index, what
  identifies its record (a phantom's seed, or a file's path with its size and mtime via
  :func:`medvl.data.volume_cache.source_fingerprint`), the transform (volume size, and a file
  dataset's transform description) and :data:`CACHE_FORMAT`. A record with none of these is keyed
  by the sha256 of its transformed volume (it has to be loaded to be keyed).
* a text: sha256 of its UTF-8 bytes (and of its kind, for a prompt or a snippet).

Storage: safetensors shards under ``<root>/<model key>/`` (one shard per encoding call, holding every
item that call encoded, tensor names ``"<item key>/<field>"``); nothing is pickled. Shards are
written to a temporary file and renamed into place, so a reader never sees half a shard. Encoding
runs in float32 under ``torch.inference_mode``; entries do not depend on the device beyond float
rounding (a cache filled on a GPU is reused on the CPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["CACHE_FORMAT", "CachedEncoder", "EmbeddingCache", "VolumeEmbeddings", "head_tensors", "model_fingerprint",
           "text_key", "volume_id", "volume_ids", "volume_key"]

# Bump when what an entry holds changes (fields, normalisation, preprocessing): old entries are then
# never matched again.
CACHE_FORMAT = 1
_SUFFIX = ".safetensors"
_VOLUME_FIELDS = ("image_features", "pooled", "depth")


def text_key(text: str, kind: str = "text") -> str:
    """sha256 hex digest of the text's UTF-8 bytes (prefixed by its kind when it is not "text": a sentence
    encoded as a prompt or a snippet is standardised with that kind's statistics, so it is another entry)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    payload = text if kind == "text" else f"{kind}\x00{text}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def volume_key(descriptor: Mapping[str, Any]) -> str:
    """sha256 hex digest of a volume descriptor (a JSON-able mapping, key order irrelevant)."""
    payload = json.dumps({"format": CACHE_FORMAT, **dict(descriptor)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def model_fingerprint(model: torch.nn.Module, extra: Optional[Mapping[str, torch.Tensor]] = None) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes, bytes) and optional extra tensors.

    The key of the cache for a model held in memory (a checkpoint on disk uses ``checkpoint_hash``
    instead, which is cheaper and the same across processes that load it).
    """
    digest = hashlib.sha256(b"medvl-model")
    items = list(model.state_dict().items()) + sorted((extra or {}).items())
    for name, tensor in items:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _record_identity(record: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """What identifies a record's volume without loading it: a file's fingerprint, or a phantom's seed."""
    from medvl.data.volume_cache import source_fingerprint

    image = record.get("image")
    if isinstance(image, (str, os.PathLike)):
        return {"file": source_fingerprint(image)}
    meta = record.get("meta") or {}
    if meta.get("seed") is not None:
        return {"seed": int(meta["seed"])}
    return None


def volume_ids(dataset, source: str, size: Sequence[int], kind: Optional[str] = None) -> List[Optional[Dict[str, Any]]]:
    """One descriptor per sample of ``dataset`` for :func:`volume_key` (None: key by content).

    ``source`` is the dataset's source as given to ``build_dataset`` ("synthetic-ct", a manifest
    path...); ``size`` the (X, Y, Z) transform size; ``kind`` "ct" / "mr" (the preprocessing family).
    """
    return [volume_id(dataset, index, source, size, kind) for index in range(len(dataset))]


def volume_id(dataset, index: int, source: str, size: Sequence[int],
              kind: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The :func:`volume_ids` descriptor of sample ``index`` alone (a caller that reads the record anyway asks
    right after, while a generated record is still kept, rather than in a pass of its own)."""
    records = getattr(dataset, "records", None)
    identity = None if records is None else _record_identity(records[index])
    if identity is None:
        return None
    descriptor = {"source": str(source), "kind": kind, "index": index, "size": [int(s) for s in size], **identity}
    transform = getattr(dataset, "transform_description", None)
    if transform is not None:
        descriptor["transform"] = transform
    return descriptor


class EmbeddingCache:
    """Encoded items of one model, in memory and (with ``root``) on disk as safetensors shards.

    Args:
        root: the cache folder (``--cache-dir``); None keeps entries in memory only.
        model_key: identifies the weights (``checkpoint_hash`` or :func:`model_fingerprint`).
    """

    def __init__(self, root: Union[str, os.PathLike, None], model_key: str) -> None:
        if not isinstance(model_key, str) or not model_key:
            raise ValueError(f"model_key: expected a non-empty string (a checkpoint hash), got {model_key!r}")
        self.model_key = model_key
        self.folder: Optional[str] = None
        if root is not None:
            root = os.path.abspath(os.path.expanduser(os.fspath(root)))
            if os.path.exists(root) and not os.path.isdir(root):
                raise NotADirectoryError(f"cache_dir {root} exists and is not a folder; pass a folder path")
            self.folder = os.path.join(root, model_key[:32])
        self._memory: Dict[str, Dict[str, torch.Tensor]] = {}
        self._on_disk: Dict[str, str] = {}  # item key -> shard path
        self._scan()

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.folder!r}, {len(self)} items)"

    def __len__(self) -> int:
        return len(set(self._memory) | set(self._on_disk))

    def _scan(self) -> None:
        if self.folder is None or not os.path.isdir(self.folder):
            return
        from safetensors import safe_open

        for name in sorted(os.listdir(self.folder)):
            if not name.endswith(_SUFFIX) or name.startswith("."):
                continue
            path = os.path.join(self.folder, name)
            try:
                with safe_open(path, framework="pt") as f:
                    names = list(f.keys())
            except Exception:  # noqa: BLE001 - an unreadable shard is ignored; its items are re-encoded
                continue
            for tensor_name in names:
                self._on_disk.setdefault(tensor_name.rsplit("/", 1)[0], path)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._on_disk

    def get(self, key: str) -> Optional[Dict[str, torch.Tensor]]:
        """The fields of one item, or None when it was never stored."""
        if key in self._memory:
            return self._memory[key]
        path = self._on_disk.get(key)
        if path is None:
            return None
        from safetensors import safe_open

        prefix = key + "/"
        with safe_open(path, framework="pt") as f:
            entry = {name[len(prefix):]: f.get_tensor(name) for name in f.keys() if name.startswith(prefix)}
        self._memory[key] = entry
        return entry

    def get_many(self, keys: Iterable[str]) -> Dict[str, Dict[str, torch.Tensor]]:
        """The stored items among ``keys`` (one read per shard, not per item)."""
        found: Dict[str, Dict[str, torch.Tensor]] = {}
        by_shard: Dict[str, List[str]] = {}
        for key in keys:
            if key in self._memory:
                found[key] = self._memory[key]
            elif key in self._on_disk:
                by_shard.setdefault(self._on_disk[key], []).append(key)
        if by_shard:
            from safetensors import safe_open

            for path, wanted in by_shard.items():
                wanted_set = set(wanted)
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        key, field = name.rsplit("/", 1)
                        if key in wanted_set:
                            found.setdefault(key, {})[field] = f.get_tensor(name)
                for key in wanted:
                    self._memory[key] = found[key]
        return found

    def put_many(self, entries: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Store items (in memory, and as one new shard on disk when the cache has a folder)."""
        if not entries:
            return
        tensors: Dict[str, torch.Tensor] = {}
        for key, fields in entries.items():
            if "/" in key:
                raise ValueError(f"cache key {key!r} must not contain '/'")
            stored = {field: value.detach().to("cpu", torch.float32).contiguous().clone()
                      for field, value in fields.items()}
            self._memory[key] = stored
            for field, value in stored.items():
                tensors[f"{key}/{field}"] = value
        if self.folder is None:
            return
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"shard-{uuid.uuid4().hex}{_SUFFIX}")
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=self.folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": str(CACHE_FORMAT), "model_key": self.model_key})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        for key in entries:
            self._on_disk[key] = path


@dataclass
class VolumeEmbeddings:
    """Encoded volumes, row i = sample i: ``image_features`` (N, D) normalised, ``pooled`` (N, W) and
    ``depth`` (N, n_z, W) before the projection. float32 CPU tensors."""

    image_features: torch.Tensor
    pooled: torch.Tensor
    depth: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_features.shape[0])


def _fold(weight: torch.Tensor, standardizer) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A bias-free projection followed by a calibrated standardiser, as one affine map (weight, bias)."""
    if standardizer is None or int(standardizer.num_samples) == 0:
        return weight, None
    return standardizer.fold(weight)


def _as_head(prompt_head: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A (D, W) weight and optional (D,) bias from a tensor, an nn.Linear, or a recipe loss holding
    ``prompts.head`` (and the standardiser of its projection, folded in); (None, None) passes."""
    if prompt_head is None:
        return None, None
    bias = None
    if isinstance(prompt_head, torch.Tensor):
        weight = prompt_head
    elif isinstance(prompt_head, torch.nn.Linear):
        weight, bias = prompt_head.weight, prompt_head.bias
    elif getattr(getattr(prompt_head, "prompts", None), "head", None) is not None:
        weight, bias = _fold(prompt_head.prompts.head.weight, getattr(prompt_head, "prompt_standardizer", None))
    else:
        raise TypeError("prompt_head: expected a (D, W) tensor, an nn.Linear or a recipe loss with a "
                        f"prompts.head (RadFinder's), got {type(prompt_head).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"prompt_head: expected a (D, W) weight, got shape {tuple(weight.shape)}")
    weight = weight.detach().to("cpu", torch.float32)
    return weight, None if bias is None else bias.detach().to("cpu", torch.float32)


def head_tensors(prompt_head: Any) -> Optional[Dict[str, torch.Tensor]]:
    """What identifies a prompt head in a cache key (:func:`model_fingerprint`'s ``extra``); None without one."""
    weight, bias = _as_head(prompt_head)
    if weight is None:
        return None
    return {"head": weight} if bias is None else {"head": weight, "head_bias": bias}


class CachedEncoder:
    """A CLIP model whose volume and text encodings go through an :class:`EmbeddingCache`.

    Args:
        model: a :class:`medvl.models.CLIPModel` (put in eval mode here).
        cache: where encodings are kept; default a memory-only cache keyed by :func:`model_fingerprint`.
        device: where the model runs (it is moved there).
        batch_size: volumes per forward pass (texts: 8x as many).
        prompt_head: RadFinder's prompt projection (``loss.prompts.head.weight`` of a checkpoint, with the
            standardisation of its output folded in as a bias when the model standardises), a (D, W) tensor,
            nn.Linear or recipe loss; None: the model's own ``visual.proj`` (and its standardiser).

    Counters: ``volumes_encoded`` / ``volumes_cached`` and ``texts_encoded`` / ``texts_cached`` count
    items run through the model and items served from the cache (memory or disk).
    """

    def __init__(self, model: torch.nn.Module, cache: Optional[EmbeddingCache] = None, *,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 8, prompt_head: Any = None) -> None:
        if not (hasattr(model, "visual") and hasattr(model, "encode_text")):
            raise TypeError(f"model: expected a medvl CLIPModel (with .visual and .encode_text), got "
                            f"{type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.head_weight, self.head_bias = _as_head(prompt_head)
        self.cache = cache if cache is not None else EmbeddingCache(
            None, model_fingerprint(model, head_tensors(prompt_head)))
        self.batch_size = int(batch_size)
        self.volumes_encoded = self.volumes_cached = self.texts_encoded = self.texts_cached = 0

    @property
    def patch_size(self) -> tuple:
        return tuple(int(p) for p in self.model.visual.patch_size)

    @property
    def has_prompt_head(self) -> bool:
        return self.head_weight is not None

    def stats(self) -> Dict[str, int]:
        return {"volumes_encoded": self.volumes_encoded, "volumes_cached": self.volumes_cached,
                "texts_encoded": self.texts_encoded, "texts_cached": self.texts_cached}

    # ----------------------------------------------------------------------------------------------
    # projections of the cached pre-projection features

    def _projection(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.head_weight is not None:
            return self.head_weight, self.head_bias
        weight = self.model.visual.proj.weight.detach().to("cpu", torch.float32)
        standardizer = getattr(self.model.visual, "standardizer", None)
        if standardizer is not None:
            standardizer = copy.deepcopy(standardizer).to("cpu")
        return _fold(weight, standardizer)

    @property
    def model_standardizes(self) -> bool:
        """Whether the model's towers standardise their embeddings (``CLIPModel.standardizes``)."""
        return bool(getattr(self.model, "standardizes", False))

    def project(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(..., W) pre-projection volume features into the text space (..., D), normalised unless told not:
        through RadFinder's prompt head when there is one, else through the model's ``visual.proj``, each
        followed by its standardisation when the model has one."""
        weight, bias = self._projection()
        if features.shape[-1] != weight.shape[1]:
            raise ValueError(f"features of width {features.shape[-1]} do not fit the projection "
                             f"{tuple(weight.shape)}")
        projected = features.to(torch.float32) @ weight.t()
        projected = projected if bias is None else projected + bias
        return F.normalize(projected, dim=-1) if normalize else projected

    # ----------------------------------------------------------------------------------------------
    # volumes

    def encode_volumes(self, dataset, ids: Optional[Sequence[Optional[Mapping[str, Any]]]] = None) -> VolumeEmbeddings:
        """Every sample of ``dataset`` (``dataset[i].volume``), from the cache where stored.

        ``ids``: one descriptor per sample (:func:`volume_ids`); None or a None entry keys that sample
        by the sha256 of its transformed volume.
        """
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset: empty, nothing to encode")
        if ids is not None and len(ids) != n:
            raise ValueError(f"ids: expected one descriptor per sample ({n}), got {len(ids)}")
        loaded: Dict[int, torch.Tensor] = {}
        keys: List[str] = []
        for i in range(n):
            descriptor = None if ids is None else ids[i]
            if descriptor is None:
                volume = _volume_of(dataset[i], i)
                loaded[i] = volume
                digest = hashlib.sha256(f"{volume.dtype}|{tuple(volume.shape)}|".encode())
                digest.update(volume.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                keys.append(volume_key({"content": digest.hexdigest()}))
            else:
                keys.append(volume_key(descriptor))
        found = self.cache.get_many(dict.fromkeys(keys))
        missing = [i for i in range(n) if keys[i] not in found]
        self.volumes_cached += n - len(missing)
        new: Dict[str, Dict[str, torch.Tensor]] = {}
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            volumes = [loaded.pop(i) if i in loaded else _volume_of(dataset[i], i) for i in chunk]
            shapes = {tuple(v.shape) for v in volumes}
            if len(shapes) > 1:
                raise ValueError(f"dataset: volumes of different shapes {sorted(shapes)} in one batch; build "
                                 "the dataset with one size")
            batch = torch.stack(volumes).to(self.device)
            with torch.inference_mode():
                out = self.model(batch, return_depth=True)
            for row, i in enumerate(chunk):
                new[keys[i]] = {"image_features": out["image_features"][row].float(),
                                "pooled": out["volume_embeddings"][row].float(),
                                "depth": out["depth_features"][row].float()}
            self.volumes_encoded += len(chunk)
        self.cache.put_many(new)
        found.update({k: self.cache.get(k) for k in new})
        entries = [found[k] for k in keys]
        return VolumeEmbeddings(*(torch.stack([e[f] for e in entries]) for f in _VOLUME_FIELDS))

    # ----------------------------------------------------------------------------------------------
    # texts

    def encode_texts(self, texts: Sequence[str], kind: str = "text") -> torch.Tensor:
        """(M, D) normalised features of ``texts`` (duplicates encoded once), from the cache where stored.
        ``kind``: what the texts are ("text": paired with volumes; "prompt", "snippet"), whose statistics
        standardise them when the model standardises (``medvl.models.text_encoder.TEXT_KINDS``)."""
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got one str; wrap it in a list")
        texts = list(texts)
        if not texts:
            raise ValueError("texts: empty, nothing to encode")
        keys = [text_key(t, kind) for t in texts]
        unique = dict.fromkeys(keys)
        found = self.cache.get_many(unique)
        todo = [(k, t) for k, t in dict(zip(keys, texts)).items() if k not in found]
        self.texts_cached += len(unique) - len(todo)
        new: Dict[str, Dict[str, torch.Tensor]] = {}
        step = self.batch_size * 8
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            with torch.inference_mode():
                features = self.model.encode_text([t for _, t in chunk], kind=kind)
            for (k, _), row in zip(chunk, features):
                new[k] = {"features": row.float()}
            self.texts_encoded += len(chunk)
        self.cache.put_many(new)
        found.update({k: self.cache.get(k) for k in new})
        return torch.stack([found[k]["features"] for k in keys])


def _volume_of(sample: Any, index: int) -> torch.Tensor:
    volume = getattr(sample, "volume", None)
    if volume is None and isinstance(sample, Mapping):
        volume = sample.get("volume")
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"sample {index}: expected a medvl Sample with a volume tensor, got {type(sample).__name__}")
    if hasattr(volume, "as_tensor"):
        volume = volume.as_tensor()
    return volume.detach().cpu()
