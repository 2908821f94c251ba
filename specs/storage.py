"""Where a run keeps its files: a local or shared directory, or a filesystem URI (``s3://``, ``gs://``,
``abfs://``, ``file://`` ... anything ``pyarrow.fs.FileSystem.from_uri`` opens, as Ray Train's
``storage_path`` does).

Ray Train writes checkpoints there itself. The run's other files (its state, the exported student,
pretrained teachers, a sweep's results) are written to a local folder and copied up, and read back
by copying down, so HF ``save_pretrained`` / ``from_pretrained`` only ever see local paths. With a
plain path every function here is the ordinary local operation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    """``base/parts...``: a URI stays a URI (no path normalisation of its scheme), a path becomes absolute."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts).resolve())


def _fs(uri: str):
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(path: str) -> bool:
    if not is_uri(path):
        return Path(path).exists()
    import pyarrow.fs
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def listdir(path: str) -> list[str]:
    """The names in folder ``path`` (empty when it does not exist)."""
    if not is_uri(path):
        return sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
    import pyarrow.fs
    fs, p = _fs(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def read_text(path: str) -> str:
    if not is_uri(path):
        return Path(path).read_text()
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def upload(local_dir: str, dest: str) -> None:
    """Copy a local folder's files to ``dest`` (a URI), replacing what is there; a no-op when ``dest``
    is that folder."""
    if not is_uri(dest):
        if Path(local_dir).resolve() != Path(dest).resolve():
            shutil.copytree(local_dir, dest, dirs_exist_ok=True)
        return
    import pyarrow.fs
    fs, p = _fs(dest)
    fs.create_dir(p, recursive=True)
    pyarrow.fs.copy_files(local_dir, p, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local folder holding ``path``'s files for the duration of the block (``path`` itself when local)."""
    if not is_uri(path):
        yield path
        return
    import pyarrow.fs
    fs, p = _fs(path)
    with tempfile.TemporaryDirectory(prefix="mlot-") as d:
        pyarrow.fs.copy_files(p, d, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield d


@contextlib.contextmanager
def local_folder(dest: str) -> Iterator[str]:
    """A local folder to write into, uploaded to ``dest`` when the block ends (``dest`` itself when local)."""
    if not is_uri(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="mlot-") as d:
        yield d
        upload(d, dest)


def node_cache(kind: str, key: str) -> Path:
    """Where this node keeps its copy of a ``kind`` folder (``data``, ``store``) identified by ``key``."""
    return Path(tempfile.gettempdir(), f"mlot-{kind}", key)


def node_copy(uri: str, kind: str, key: str) -> str:
    """This node's copy of the folder at ``uri``, made once per ``key`` and node: the first process takes a file
    lock and downloads, the others on the node wait for it and then use its copy. The copy is made under a
    temporary name and renamed, so one that exists is whole (a download killed halfway leaves no copy)."""
    import fcntl

    import pyarrow.fs

    target = node_cache(kind, key)
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not target.exists():
            tmp = tempfile.mkdtemp(prefix=f"{key}.", dir=target.parent)
            fs, p = _fs(uri)
            pyarrow.fs.copy_files(p, tmp, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
            os.replace(tmp, target)
    return str(target)
