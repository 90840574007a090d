"""Where files live: a local directory or an object-store prefix, addressed by path or URI.

``open_location("runs/tiny")``, ``open_location("file:///data/x")``, ``open_location("s3://bucket/prefix")``
and ``open_location("gs://bucket/prefix")`` give a :class:`Location` on :mod:`pyarrow.fs`. Writes are
*write-once*: an object appears whole or not at all, and nothing is ever renamed (S3 and GCS have no
atomic rename). On object stores a finished upload is atomic by itself; on a local disk the bytes go
to a hidden ``.<name>.partial-<id>`` sibling first and are moved into place (``os.replace``), so a
reader never sees half a file there either. Names are chosen by the callers so that a retried write
produces the same name with the same content (see :mod:`limits_ray.storage.sample_store`).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["Location", "StorageError", "check_writable", "local_location", "open_location"]

OBJECT_SCHEMES = ("s3", "gs", "gcs")


class StorageError(ValueError):
    """A store or output location that cannot be used; the message names the URI and the fix."""


@dataclass(frozen=True)
class Location:
    """A directory (or object prefix) on a :class:`pyarrow.fs.FileSystem`.

    Attributes:
        filesystem: the pyarrow filesystem (picklable: locations travel to Ray tasks as they are).
        path: the filesystem's path of the directory (no scheme, no trailing slash).
        uri: how to name it to a person (the URI or absolute path).
    """

    filesystem: pafs.FileSystem
    path: str
    uri: str

    @property
    def local(self) -> bool:
        """Whether this is a local directory (then :attr:`local_path` is usable)."""
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        """The local directory (only for :attr:`local` locations)."""
        if not self.local:
            raise StorageError(f"{self.uri} is not on a local disk")
        return Path(self.path)

    @property
    def name(self) -> str:
        """The last path component."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> "Location":
        """The location ``parts`` below this one."""
        suffix = "/".join(str(part).strip("/") for part in parts if str(part))
        return Location(self.filesystem, f"{self.path}/{suffix}", f"{self.uri.rstrip('/')}/{suffix}")

    def exists(self) -> bool:
        """Whether a file or a non-empty directory is here."""
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        """Whether a file (object) is here."""
        return self.filesystem.get_file_info(self.path).type == pafs.FileType.File

    def files(self, recursive: bool = False, suffix: str = "") -> list["Location"]:
        """Files below this directory (none if it does not exist), sorted by path; hidden names skipped."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        found = []
        for info in self.filesystem.get_file_info(selector):
            relative = info.path[len(self.path):].lstrip("/")
            if info.type != pafs.FileType.File or any(part.startswith(".") for part in relative.split("/")):
                continue
            if relative.endswith(suffix):
                found.append(self.join(relative))
        return sorted(found, key=lambda location: location.path)

    def subdirectories(self) -> list["Location"]:
        """Directories directly below this one, sorted by name."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        names = [info.base_name for info in self.filesystem.get_file_info(selector) if info.type == pafs.FileType.Directory]
        return [self.join(name) for name in sorted(names)]

    def write_bytes(self, data: bytes) -> None:
        """Write this file whole: a reader sees the old content or the new one, never a part."""
        if self.local:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}")
            partial.write_bytes(data)
            os.replace(partial, path)
            return
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(data)

    def read_bytes(self) -> bytes:
        """The file's content."""
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def write_text(self, text: str) -> None:
        """Write UTF-8 text whole."""
        self.write_bytes(text.encode("utf-8"))

    def read_text(self) -> str:
        """The file's UTF-8 text."""
        return self.read_bytes().decode("utf-8")

    def write_json(self, data: Any) -> None:
        """Write ``data`` as indented JSON, whole."""
        self.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))

    def read_json(self) -> Any:
        """The file's JSON."""
        return json.loads(self.read_text())

    def write_table(self, table: pa.Table) -> None:
        """Write ``table`` as one Parquet file, whole."""
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        self.write_bytes(buffer.getvalue().to_pybytes())

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file (or a directory of them) as a table."""
        return pq.read_table(self.path, filesystem=self.filesystem, columns=columns)

    @contextlib.contextmanager
    def table_writer(self, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """A :class:`pyarrow.parquet.ParquetWriter` for this file, which appears whole when the block ends
        without an error (and not at all otherwise).

        On a local disk the rows stream to a hidden sibling that is moved into place at the end; on an
        object store they are gathered in memory and uploaded at once, as :meth:`write_table` does.
        """
        if self.local:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}")
            try:
                with pq.ParquetWriter(partial, schema) as writer:
                    yield writer
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            return
        buffer = pa.BufferOutputStream()
        with pq.ParquetWriter(buffer, schema) as writer:
            yield writer
        self.write_bytes(buffer.getvalue().to_pybytes())

    @contextlib.contextmanager
    def parquet_file(self) -> Iterator[pq.ParquetFile]:
        """This Parquet file, opened for reading in row groups or batches (closed when the block ends)."""
        with self.filesystem.open_input_file(self.path) as handle:
            yield pq.ParquetFile(handle)

    def delete(self) -> None:
        """Remove this file, if it is there."""
        try:
            self.filesystem.delete_file(self.path)
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        """Remove this directory and everything below it, if it is there."""
        if self.filesystem.get_file_info(self.path).type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)


def _object_store(uri: str, endpoint_override: str, region: str) -> tuple[pafs.FileSystem, str]:
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and endpoint_override:
        endpoint = urlparse(endpoint_override if "://" in endpoint_override else f"http://{endpoint_override}")
        options: dict[str, Any] = {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme}
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "s3" and region:
        return pafs.S3FileSystem(region=region), f"{parsed.netloc}{parsed.path}".rstrip("/")
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return filesystem, path.rstrip("/")


def open_location(uri: str | Path, endpoint_override: str = "", region: str = "", where: str = "path") -> Location:
    """The :class:`Location` of a local path, ``file://``, ``s3://`` or ``gs://`` URI.

    A relative local path is taken below ``$LIMITS_RAY_ROOT`` (a path or URI) when that is set, else
    made absolute against the current directory. ``endpoint_override``
    (``host:port`` or ``http://host:port``) points ``s3://`` at an S3-compatible server. ``where``
    names the config key in error messages.
    """
    text = str(uri)
    scheme = urlparse(text).scheme
    if scheme in OBJECT_SCHEMES:
        if not urlparse(text).netloc:
            raise StorageError(f"{where} {text!r}: name a bucket, e.g. s3://my-bucket/limits-ray")
        try:
            filesystem, path = _object_store(text.replace("gcs://", "gs://", 1), endpoint_override, region)
        except (pa.ArrowInvalid, OSError) as error:
            raise StorageError(f"{where} {text!r}: cannot open ({error}); check the URI and credentials") from None
        return Location(filesystem, path, text.split("?", 1)[0].rstrip("/"))
    if scheme == "file":
        text = urlparse(text).path
    elif scheme and len(scheme) > 1:
        raise StorageError(f"{where} {text!r}: unsupported scheme {scheme!r}; use a local path, file://, s3:// or gs://")
    root = os.environ.get("LIMITS_RAY_ROOT", "")
    if root and not Path(text).expanduser().is_absolute():
        return open_location(f"{root.rstrip('/')}/{text}", endpoint_override, region, where)
    absolute = str(Path(text).expanduser().absolute())
    return Location(pafs.LocalFileSystem(), absolute, absolute)


def local_location(path: str | Path) -> Location:
    """The :class:`Location` of a local directory as given (relative to the current directory, never below
    ``$LIMITS_RAY_ROOT``: for directories a command names, such as ``limits-ray reduce --out``); its
    :attr:`~Location.uri` names it as given."""
    return Location(pafs.LocalFileSystem(), str(Path(path).expanduser().absolute()), str(path).rstrip("/") or ".")


def check_writable(location: Location, where: str) -> None:
    """Write and delete a small probe object, or raise :class:`StorageError` naming ``where``, the URI and the fix.

    Run before any actor starts, so a missing bucket, missing credentials or a read-only disk stop
    the run at once instead of after the first batch.
    """
    probe = location.join(f".probe-{uuid.uuid4().hex[:12]}")
    try:
        if location.local:
            Path(location.path).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"limits-ray write probe")
        probe.delete()
    except (OSError, pa.ArrowException) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        hint = "create it or fix the path"
        if "NO_SUCH_BUCKET" in message or "bucket does not exist" in message.lower():
            hint = "the bucket does not exist: create it or point the key at an existing bucket"
        elif any(word in message.upper() for word in ("ACCESS_DENIED", "CREDENTIAL", "FORBIDDEN", "SIGNATURE")):
            hint = "set credentials with write access (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or the instance role)"
        raise StorageError(f"{where} {location.uri}: not writable ({message}); {hint}") from None
