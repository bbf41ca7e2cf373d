"""Finding Parquet files and moving results, on local disk or any filesystem pyarrow knows.

Paths are resolved in the driver, before Ray starts, so a typo, an unreadable file or a file that
is not Parquet fails the job with its name, and so each input file gets a stable index that the
batch job uses to tell which outputs are complete (see `pipelines.batch`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sentiment.errors import InvalidInputError

# What a directory listing takes as Parquet, as Ray Data does; an explicitly named file or a glob
# match is read whatever its name.
PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
_GLOB_CHARS = re.compile(r"[*?\[]")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Footers are small; reading them from object storage is latency-bound, so a few in parallel.
_FOOTER_THREADS = 16


@dataclass(frozen=True)
class Location:
    """A path on a filesystem: ``path`` is what the filesystem takes, `uri` what messages show."""

    filesystem: pafs.FileSystem
    path: str
    scheme: str = ""
    """What comes before ``path`` in the URI the user wrote (``s3://``); empty for local paths."""

    @property
    def uri(self) -> str:
        return self.scheme + self.path

    def at(self, path: str) -> Location:
        """Another path on the same filesystem."""
        return Location(self.filesystem, path, self.scheme)

    def child(self, name: str) -> Location:
        return self.at(f"{self.path.rstrip('/')}/{name}")

    def sibling(self, suffix: str) -> Location:
        """``path`` with ``suffix`` appended to its last component (``out`` -> ``out.staging``)."""
        return self.at(self.path.rstrip("/") + suffix)


@dataclass(frozen=True)
class ParquetInput:
    """One input file, described from its footer."""

    index: int
    path: str
    uri: str
    rows: int
    size: int
    schema: pa.Schema
    row_groups: tuple[int, ...] = ()
    """Rows of each row group, in order."""


def locate(spec: str) -> Location:
    """The filesystem and path of a local path or a URI (``s3://bucket/key``, ``gs://...``, ``file:///...``)."""
    if _URI.match(spec):
        glob = _GLOB_CHARS.search(spec)
        if glob:
            # URI parsers reject glob characters: parse the directory before them, append the pattern.
            cut = spec.rfind("/", 0, glob.start())
            base = locate(spec[:cut])
            return base.at(base.path.rstrip("/") + spec[cut:])
        try:
            filesystem, path = pafs.FileSystem.from_uri(spec)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise InvalidInputError(f"cannot open {spec}: {exc}") from exc
        path = path.rstrip("/") or path
        scheme = spec[: spec.index("://") + 3]
        return Location(filesystem, path, scheme)
    # Absolute, because Ray workers do not run in the driver's working directory.
    return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec)))


def list_parquet(spec: str) -> list[Location]:
    """The files ``spec`` names: itself, the Parquet files under a directory, or a glob's matches.

    Files and directories whose names start with ``_`` or ``.`` (``_SUCCESS``, staging areas) are
    skipped under a directory or a glob, as Ray Data and Spark do. Raises `InvalidInputError` naming ``spec``
    when nothing is there.
    """
    location = locate(spec)
    if _GLOB_CHARS.search(location.path):
        return _glob(location, spec)
    info = _info(location)
    if info.type == pafs.FileType.File:
        return [location]
    if info.type == pafs.FileType.Directory:
        found = [
            item
            for item in _walk(location)
            if item.path.lower().endswith(PARQUET_EXTENSIONS) and not _hidden(item.path[len(location.path) :])
        ]
        if not found:
            raise InvalidInputError(f"input directory {spec} holds no Parquet files ({', '.join(PARQUET_EXTENSIONS)})")
        return found
    raise InvalidInputError(f"input {spec} does not exist")


def read_footers(files: Sequence[Location]) -> list[ParquetInput]:
    """Row counts and schemas of Parquet files, from their footers only; errors name the file."""

    def read(item: tuple[int, Location]) -> ParquetInput:
        index, location = item
        try:
            with location.filesystem.open_input_file(location.path) as handle:
                metadata = pq.ParquetFile(handle).metadata
                return ParquetInput(
                    index=index,
                    path=location.path,
                    uri=location.uri,
                    rows=metadata.num_rows,
                    size=handle.size(),
                    schema=metadata.schema.to_arrow_schema(),
                    row_groups=tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)),
                )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidInputError(f"{location.uri} is not a readable Parquet file: {exc}") from exc
        except OSError as exc:
            raise InvalidInputError(f"cannot read {location.uri}: {exc}") from exc

    with ThreadPoolExecutor(max_workers=_FOOTER_THREADS) as pool:
        return list(pool.map(read, enumerate(files)))


def parquet_rows(location: Location) -> int | None:
    """Rows of a complete Parquet file, or None when it is unreadable or incomplete (`is_whole`): cut short
    by a crash, or by a full disk."""
    try:
        with location.filesystem.open_input_file(location.path) as handle:
            metadata = pq.ParquetFile(handle).metadata
            return int(metadata.num_rows) if is_whole(metadata, handle.size()) else None
    except (pa.ArrowInvalid, OSError):
        return None


def is_whole(metadata: pq.FileMetaData, size: int) -> bool:
    """Whether every column chunk the footer lists holds an entry for each row of its row group, within the file.

    A file cut short has no footer; but a write that fails for lack of space can leave one: Arrow's
    writer still closes the file, and its footer, small enough to fit, lists the column chunks it
    could not write with no values (measured with pyarrow 26: 8 rows, the ``text`` chunk empty). A
    leaf column has an entry for every row, null or not, even in nested types.
    """
    data_end = size - 8 - metadata.serialized_size
    for group_index in range(metadata.num_row_groups):
        group = metadata.row_group(group_index)
        for column_index in range(group.num_columns):
            chunk = group.column(column_index)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            if chunk.num_values < group.num_rows or start + chunk.total_compressed_size > data_end:
                return False
    return True


def list_files(location: Location) -> list[Location]:
    """Every file under a directory (recursively), sorted by path; empty when it does not exist."""
    if _info(location).type != pafs.FileType.Directory:
        return []
    return _walk(location)


def exists(location: Location) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def delete(location: Location) -> None:
    """Delete a file or a directory tree; nothing when it is absent."""
    info = _info(location)
    if info.type == pafs.FileType.Directory:
        location.filesystem.delete_dir(location.path)
    elif info.type == pafs.FileType.File:
        location.filesystem.delete_file(location.path)


def renames_directories(filesystem: pafs.FileSystem) -> bool:
    """Whether a directory on ``filesystem`` moves with one rename (local disk), so readers see all of it or nothing.

    Object stores have no directories to rename, and rename a file by copying it and deleting the original.
    """
    return isinstance(filesystem, pafs.LocalFileSystem)


def move(source: Location, target: Location) -> None:
    """Move a file (into a directory that exists), or a directory tree to a path that does not exist yet.

    On local disk a directory moves with one rename (its parent is made first). Object stores have
    no directories to rename: each file is moved (copied, then deleted) on its own.
    """
    filesystem = source.filesystem
    if _info(source).type == pafs.FileType.File:
        filesystem.move(source.path, target.path)
        return
    if renames_directories(filesystem):
        parent = target.path.rsplit("/", 1)[0]
        if parent:
            filesystem.create_dir(parent, recursive=True)
        filesystem.move(source.path, target.path)
        return
    moves = [(item.path, target.path + item.path[len(source.path) :]) for item in _walk(source)]
    for parent in sorted({path.rsplit("/", 1)[0] for _, path in moves}):
        filesystem.create_dir(parent, recursive=True)
    for path, moved in moves:
        filesystem.move(path, moved)
    delete(source)


def write_text(location: Location, text: str) -> None:
    with location.filesystem.open_output_stream(location.path) as stream:
        stream.write(text.encode("utf-8"))


def read_text(location: Location) -> str:
    with location.filesystem.open_input_stream(location.path) as stream:
        return bytes(stream.read()).decode("utf-8")


class RecordingHandler(pafs.FileSystemHandler):
    """Another filesystem, with every call recorded: ``pafs.PyFileSystem(RecordingHandler(fs))``.

    Shows what a job does to its storage (``calls``: each method's name and paths, in order), e.g.
    how many objects the commit copies (`move` and `copy_file`; a move is a copy on an object store).
    A `pafs.PyFileSystem` is no `pafs.LocalFileSystem`, so the job treats it as an object store.
    """

    def __init__(self, filesystem: pafs.FileSystem) -> None:
        self.filesystem = filesystem
        self.calls: list[tuple[str, ...]] = []

    def count(self, method: str) -> int:
        return sum(call[0] == method for call in self.calls)

    def get_type_name(self) -> str:
        return f"recording+{self.filesystem.type_name}"

    def normalize_path(self, path: str) -> str:
        return str(self.filesystem.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return list(self.filesystem.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self.filesystem.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.calls.append(("create_dir", path))
        self.filesystem.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.calls.append(("delete_dir", path))
        self.filesystem.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.calls.append(("delete_dir_contents", path))
        self.filesystem.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.calls.append(("delete_root_dir_contents",))
        self.filesystem.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.calls.append(("delete_file", path))
        self.filesystem.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.calls.append(("move", src, dest))
        self.filesystem.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.calls.append(("copy_file", src, dest))
        self.filesystem.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.filesystem.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.filesystem.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        self.calls.append(("open_output_stream", path))
        return self.filesystem.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        self.calls.append(("open_append_stream", path))
        return self.filesystem.open_append_stream(path, metadata=metadata)


class SmallDiskHandler(RecordingHandler):
    """Another filesystem as a disk of ``capacity`` bytes at ``root``: ``pafs.PyFileSystem(SmallDiskHandler(...))``.

    A write that would take the files under ``root`` past ``capacity`` bytes fails with
    ``OSError(ENOSPC)``, as a full disk fails it, leaving what it had written; deleting files frees
    the space. The files themselves are the count, so every Ray worker that gets a pickled copy of
    the filesystem sees one disk. Tests use it to fill the batch job's output disk at a chosen point.
    """

    def __init__(self, filesystem: pafs.FileSystem, root: str, capacity: int) -> None:
        super().__init__(filesystem)
        self.root = root
        self.capacity = capacity

    def get_type_name(self) -> str:
        return f"small-disk+{self.filesystem.type_name}"

    def used(self) -> int:
        """Bytes in the files under ``root``."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        return sum(info.size or 0 for info in infos if info.type == pafs.FileType.File)

    def take(self, size: int, path: str) -> None:
        """Raise ``OSError(ENOSPC)`` when ``size`` more bytes do not fit."""
        if self.used() + size > self.capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def copy_file(self, src: str, dest: str) -> None:
        self.take(self.filesystem.get_file_info(src).size or 0, dest)
        super().copy_file(src, dest)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        return pa.PythonFile(_DiskStream(self, path, super().open_output_stream(path, metadata)), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        return pa.PythonFile(_DiskStream(self, path, super().open_append_stream(path, metadata)), mode="w")


class _DiskStream:
    """A file being written on a `SmallDiskHandler`'s disk: each write first takes its bytes from it."""

    def __init__(self, disk: SmallDiskHandler, path: str, stream: pa.NativeFile) -> None:
        self.disk = disk
        self.path = path
        self.stream = stream
        self.written = 0

    @property
    def closed(self) -> bool:
        return bool(self.stream.closed)

    def write(self, data: bytes) -> int:
        self.disk.take(len(data), self.path)
        self.written += len(data)
        return int(self.stream.write(data))

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def _info(location: Location) -> pafs.FileInfo:
    try:
        return location.filesystem.get_file_info(location.path)
    except OSError as exc:
        raise InvalidInputError(f"cannot access {location.uri}: {exc}") from exc


def _walk(location: Location) -> list[Location]:
    selector = pafs.FileSelector(location.path, recursive=True)
    infos = location.filesystem.get_file_info(selector)
    return [
        location.at(info.path) for info in sorted(infos, key=lambda info: info.path) if info.type == pafs.FileType.File
    ]


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.strip("/").split("/"))


def _glob(location: Location, spec: str) -> list[Location]:
    parts = location.path.split("/")
    static = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
    base = location.at("/".join(parts[:static]) or "/")
    pattern = _glob_regex("/".join(parts[static:]))
    if _info(base).type != pafs.FileType.Directory:
        raise InvalidInputError(f"input {spec} matches no files ({base.uri} is not a directory)")
    found = [
        item
        for item in _walk(base)
        if pattern.fullmatch(relative := item.path[len(base.path) :].lstrip("/")) and not _hidden(relative)
    ]
    if not found:
        raise InvalidInputError(f"input {spec} matches no files")
    return found


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` stay within one path component, ``**/`` spans any number of them."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))
