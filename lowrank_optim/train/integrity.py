"""Checkpoints that run no code and whose corruption is found: digests, and a tensors-only DCP reader.

* **Single-file checkpoints** (``checkpoint.pt``) carry ``digest``: the SHA-256 of every tensor's bytes
  (with its dtype and shape) and one SHA-256 over the whole tree (every key, every plain value, every
  tensor's digest), computed at save from the objects written (by up to 8 threads). ``--resume`` recomputes both from what
  ``torch.load(weights_only=True)`` read and refuses the file, naming the first tensor that differs (a
  flipped bit in a weight), or its settings when only a plain value does.
* **Distributed checkpoints** (``checkpoint.dcp/``) list every file with its size and SHA-256 in
  ``meta.pt`` (each rank hashes the shards it wrote, rank 0 the ``.metadata``), and ``meta.pt`` carries a
  tree digest like the single file. ``--resume`` checks every file before torch reads any (each rank a
  share of them), so a flipped byte, a truncated or missing shard, or a replaced ``.metadata`` is refused
  in one line naming the file.
* **Reading a distributed checkpoint runs no code**, even when an attacker also rewrites ``meta.pt``'s
  digests: torch's reader unpickles ``.metadata`` with plain ``pickle.load`` and reads non-tensor entries
  with ``torch.load(weights_only=False)``. :func:`safe_dcp_load` unpickles ``.metadata`` with an allow-list
  of the classes torch's own metadata is made of (:data:`METADATA_GLOBALS`, torch dtypes) and reads
  non-tensor entries with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError

DIGEST_KEY = "digest"
ALGORITHM = "sha256"
_CHUNK = 1 << 24  # bytes hashed at a time when reading a file

#: The (module, name) pairs torch.distributed.checkpoint's ``.metadata`` pickle may name; torch dtypes too.
METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *{("pathlib", name) for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
})


# ---------------------------------------------------------------------------- tree digests
def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (row-major, on the CPU)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def tree_digest(obj: Any) -> dict[str, Any]:
    """``{"algorithm", "tensors": {path: digest}, "all": digest}`` of a tree of dicts, lists, tuples,
    tensors and plain values (a checkpoint without its ``digest`` entry). The tensors are hashed by a
    pool of threads (hashlib releases the GIL), in the order of the tree."""
    tree = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    found: list[tuple[str, Tensor]] = []
    _walk(tree, "", lambda path, t: found.append((path, t)) or "")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(tensor_digest, [t for _, t in found]))
    tensors = {path: d for (path, _), d in zip(found, digests)}
    it = iter(digests)
    whole = hashlib.sha256("".join(_walk(tree, "", lambda path, t: next(it))).encode())
    return {"algorithm": ALGORITHM, "tensors": tensors, "all": whole.hexdigest()}


def _walk(x: Any, path: str, tensor: Any) -> list[str]:
    """The lines the whole-tree digest hashes: every container's type and length, every key, every plain
    value's type and repr, and ``tensor(path, t)`` (a tensor's digest) for every tensor, in order."""
    if isinstance(x, Tensor):
        return [f"{path}\0tensor\0{tensor(path, x)}\n"]
    if isinstance(x, dict):
        lines = [f"{path}\0dict\0{len(x)}\n"]
        for key, value in x.items():
            lines.append(f"{path}\0key\0{type(key).__name__}\0{key!r}\n")
            lines += _walk(value, f"{path}.{key}" if path else str(key), tensor)
        return lines
    if isinstance(x, (list, tuple)):
        lines = [f"{path}\0{type(x).__name__}\0{len(x)}\n"]
        for i, value in enumerate(x):
            lines += _walk(value, f"{path}[{i}]", tensor)
        return lines
    return [f"{path}\0{type(x).__name__}\0{x!r}\n"]


def with_digest(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` and its ``digest`` entry (what :func:`verify_tree` checks)."""
    return {**obj, DIGEST_KEY: tree_digest(obj)}


def verify_tree(obj: dict[str, Any], where: Path | str) -> None:
    """Raise CheckpointError when ``obj`` (read from the checkpoint ``where``) is not what was saved."""
    saved = obj.get(DIGEST_KEY)
    if not isinstance(saved, dict) or saved.get("algorithm") != ALGORITHM or not isinstance(saved.get("tensors"), dict):
        raise CheckpointError(f"--resume: the checkpoint {str(where)!r} has no valid digest of its contents, so its "
                              "integrity cannot be checked; it is corrupt, or was not written by lowrank-optim")
    now = tree_digest(obj)
    if now["all"] == saved.get("all"):
        return
    changed = next((path for path, d in now["tensors"].items() if saved["tensors"].get(path) != d), None)
    what = f"the tensor {changed!r} differs" if changed else "its settings (values that are not tensors) differ"
    raise CheckpointError(f"--resume: the checkpoint {str(where)!r} is corrupt: {what} from what was saved (bit "
                          "rot or an edited file); resume from another copy, or start again")


# ---------------------------------------------------------------------------- file digests
def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": digest}`` of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, ALGORITHM: h.hexdigest()}


def files_digest(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {name: file_digest(folder / name) for name in sorted(names)}


def verify_files(folder: Path, expected: dict[str, Any], names: Iterable[str]) -> str | None:
    """Why one of the files ``names`` in ``folder`` is not the one ``expected`` lists (None: all are)."""
    for name in names:
        path, want = folder / name, expected[name]
        if not path.is_file():
            return f"its file {name!r} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"its file {name!r} has {size} bytes, {want.get('bytes')} were written (truncated or replaced)"
        if file_digest(path)[ALGORITHM] != want.get(ALGORITHM):
            return f"its file {name!r} differs from what was written (bit rot or an edited file)"
    return None


# ---------------------------------------------------------------------------- DCP without unpickling code
class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a distributed checkpoint's metadata")


def read_metadata(path: Path) -> Any:
    """The ``.metadata`` of the distributed checkpoint folder ``path``, unpickled with the allow-list."""
    with open(path / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


def _reader_classes() -> tuple[type, type]:
    """(SafeReader, SafeLoadPlanner): torch's FileSystemReader and DefaultLoadPlanner, with ``.metadata``
    read by :func:`read_metadata` and non-tensor entries by ``torch.load(weights_only=True)``. Built on
    first use, so that importing this module needs no torch.distributed."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, default_planner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(Path(self.path))  # our saves write the one global .metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeReader, SafeLoadPlanner


def safe_dcp_load(state: dict[str, Any], path: Path) -> None:
    """``torch.distributed.checkpoint.load(state, path)`` with :class:`SafeReader` and :class:`SafeLoadPlanner`."""
    import torch.distributed.checkpoint as dcp

    reader, planner = _reader_classes()
    dcp.load(state, storage_reader=reader(str(path)), planner=planner())


__all__ = ["METADATA_GLOBALS", "file_digest", "files_digest", "read_metadata", "safe_dcp_load", "tensor_digest",
           "tree_digest", "verify_files", "verify_tree", "with_digest"]
