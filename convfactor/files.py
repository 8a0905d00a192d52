"""File helpers every layer may use: atomic writes, output checks, and one-line readers.

A leaf module (it imports no other convfactor module), so writing a checkpoint, a plan or a report
does not load the model format, compression or methods.  The model directory format itself is
:mod:`convfactor.io`.

- :func:`atomic_write` writes via a temporary sibling and ``os.replace``: a crash leaves the old
  file or the new one, never half of one.  Files get the permissions the user's umask gives a new
  file (not ``mkstemp``'s 0600).
- :func:`check_output` / :func:`check_writable` fail before any work when an output would replace
  something the caller did not agree to, or cannot be written.
- :func:`read_structured` / :func:`read_safetensors` turn an unreadable, empty or malformed file
  into one ValueError line naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

__all__ = ["atomic_write", "temporary_sibling_dir", "check_writable", "check_output", "read_structured", "read_safetensors",
           "file_sha256"]


def _umask() -> int:
    """The process's umask (read and restored: ``os.umask`` has no read-only form)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any work) if ``path``'s parent directory is missing or not writable."""
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OSError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OSError(f"cannot write {path}: directory {parent} is not writable")
    return path

def check_output(path: str | os.PathLike, *, overwrite: bool = False, directory: bool = False) -> Path:
    """Fail before any work when writing ``path`` would replace something the caller did not agree to.

    A file output (``directory=False``) that exists is replaced only with ``overwrite``; a directory
    in its place never is.  A directory output that exists and is not empty needs ``overwrite``, and
    then only the files convfactor writes there are replaced (the others are kept); a file in its
    place never is.  Also checks that the parent directory exists and is writable.
    """
    path = check_writable(path)
    if not path.exists():
        return path
    if directory and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
    if not directory and path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    if directory and not any(path.iterdir()):
        return path
    if not overwrite:
        what = "is a directory that is not empty" if directory else "exists"
        raise FileExistsError(f"{path} {what}; pass --overwrite (overwrite=True) to replace "
                              + ("the files convfactor writes there (other files are kept)" if directory else "it"))
    return path

def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file via a temporary sibling and ``os.replace`` (no temporary is left on failure)."""
    path = check_writable(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

def read_safetensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is one ValueError line."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    try:
        return load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types (and OSError, ...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"{file} is not a valid safetensors file ({reason})") from None

def read_structured(path: str | os.PathLike, what: str = "file") -> Any:
    """The data of a YAML file (JSON for ``.json``); an unreadable, empty or malformed file is one
    ValueError line naming it (with the line and column of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a text file") from None
    if not text.strip():
        raise ValueError(f"{what} {path} is empty")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} {path}: invalid YAML{where}: {problem}") from None


def temporary_sibling_dir(path: str | os.PathLike) -> Path:
    """A new empty directory beside ``path`` to build an output in before renaming it into place;
    its mode follows the umask (``mkdtemp`` alone makes it 0700, unreadable to a shared server)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of the file at ``path`` (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
