"""Finding, downloading and verifying data files.

Where data comes from, in order:

1. the data directory: the explicit ``data_dir`` argument, else the ``FEWTUNE_DATA_DIR``
   environment variable, else ``../shared/data`` relative to the current working directory if it
   exists (the layout of the project's development machine), else none;
2. the download cache: ``FEWTUNE_CACHE_DIR``, else ``~/.cache/fewtune/data``;
3. the file's official URL, downloaded into the cache with ``pooch`` (its downloader, known-hash
   check and Unzip/Decompress processors) into a temporary directory, verified, then atomically
   renamed, so a failed or corrupt download never leaves a file behind.

Every file is verified by sha256 before use, because a silently truncated or edited eval set
would change every reported number. Verification results are memoised in-process, keyed on
path, size and modification time, so repeated loads do not re-hash large files.

Compressed files: when a ``DataFile`` has a ``content_sha256`` (the checksum of the decompressed
content, e.g. HANS, stored as ``.txt.gz``), a ``.gz`` file is accepted if either its own bytes match
``sha256`` or its decompressed content matches ``content_sha256`` (gzip bytes depend on the
compressor, the content does not). The plain, uncompressed file (the relpath without ``.gz``) is
accepted too and verified against ``content_sha256``; downloads of such files are stored plain.
Use :func:`open_text` to read either form.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

from fewtune.errors import DataError
from fewtune.tasks.base import DataFile

DATA_DIR_ENV = "FEWTUNE_DATA_DIR"
CACHE_DIR_ENV = "FEWTUNE_CACHE_DIR"
DEFAULT_RELATIVE_DATA_DIR = Path("..") / "shared" / "data"
DOWNLOAD_TIMEOUT_S = 60.0
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20

# (resolved path, size, mtime_ns, kind) -> sha256 hex; kind is "raw" or "content".
_HASH_MEMO: dict[tuple[str, int, int, str], str] = {}


class DownloadError(DataError):
    """The download itself failed (network, HTTP status, bad archive), as opposed to wrong content."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The data directory to read from: argument > $FEWTUNE_DATA_DIR > ./../shared/data > None.

    An explicitly given directory (argument or env) must exist: silently falling back elsewhere
    would hide a typo and maybe evaluate on different data.
    """
    if data_dir is not None:
        path, origin = Path(data_dir).expanduser(), "the data_dir argument"
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        default = Path.cwd() / DEFAULT_RELATIVE_DATA_DIR
        return default.resolve() if default.is_dir() else None
    if not path.is_dir():
        raise DataError(
            f"data directory '{path}' (from {origin}) does not exist or is not a directory",
            f"create it and put the data files there, or unset {DATA_DIR_ENV} / pass another data_dir",
        )
    return path.resolve()


def cache_dir() -> Path:
    """Where downloaded files are kept: $FEWTUNE_CACHE_DIR or ~/.cache/fewtune/data."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fewtune" / "data"


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_text(path: Path) -> io.TextIOBase:
    """Open a UTF-8 text file for reading, transparently decompressing gzip (by magic bytes)."""
    if is_gzip(path):  # utf-8-sig: a byte-order mark (Excel's CSV export) is not part of the first column name
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_text(path: Path) -> str:
    """The whole file as text; a DataError (not a UnicodeDecodeError) if it is not UTF-8."""
    try:
        with open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e})", "re-download the file or convert it to UTF-8") from None
    except (OSError, EOFError) as e:  # e.g. a truncated .gz
        raise DataError(f"{path}: cannot be read ({e})", "delete it and fetch it again") from None


def sha256_of(path: Path, *, content: bool = False) -> str:
    """sha256 of the file's bytes, or of its decompressed content (``content=True``), memoised."""
    content = content and is_gzip(path)  # a plain file's content hash is its raw hash
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, "content" if content else "raw")
    if key in _HASH_MEMO:
        return _HASH_MEMO[key]
    h = hashlib.sha256()
    opener = gzip.open if content else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read or decompressed ({e})", "delete it and fetch it again") from None
    _HASH_MEMO[key] = digest = h.hexdigest()
    return digest


def _plain_relpath(datafile: DataFile) -> str | None:
    """The uncompressed variant's relpath, for files that may be stored either way (HANS)."""
    if datafile.content_sha256 and datafile.relpath.endswith(".gz"):
        return datafile.relpath[: -len(".gz")]
    return None


def _candidates(datafile: DataFile, base: Path) -> list[Path]:
    paths = [base / datafile.relpath]
    plain = _plain_relpath(datafile)
    if plain:
        paths.append(base / plain)
    return paths


def _check(path: Path, datafile: DataFile) -> str | None:
    """None if ``path`` matches either checksum (see module doc), else a description of the mismatch."""
    problems: list[str] = []
    if datafile.sha256 is not None:
        actual = sha256_of(path)
        if actual == datafile.sha256:
            return None
        problems.append(f"sha256 {actual}, expected {datafile.sha256}")
    if datafile.content_sha256 is not None:
        actual = sha256_of(path, content=True)
        if actual == datafile.content_sha256:
            return None
        what = "decompressed content sha256" if is_gzip(path) else "content sha256"
        problems.append(f"{what} {actual}, expected {datafile.content_sha256}")
    return "; ".join(problems) or None


def verify(path: Path, datafile: DataFile) -> Path:
    """Return ``path`` if it matches ``datafile``'s checksums, else raise a DataError saying how to fix it."""
    problem = _check(path, datafile)
    if problem is None:
        return path
    where = f"download it again from {datafile.url}" if datafile.url else "replace it with an intact copy"
    raise DataError(
        f"data file '{path}' ({datafile.relpath}) is corrupt or a different version: {problem}",
        f"delete '{path}' and {where}" + (" (fewtune downloads it automatically once it is deleted)" if datafile.url else ""),
    )


def fetch(datafile: DataFile, data_dir: str | os.PathLike[str] | None = None, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """A verified local path for ``datafile``: from the data directory, the cache, or its URL.

    ``datafile.relpath`` may be absolute (custom tasks), in which case only that path is used.
    """
    base = resolve_data_dir(data_dir)
    if Path(datafile.relpath).is_absolute():
        for p in _candidates(datafile, Path("/")):
            if p.is_file():
                return verify(p, datafile)
        raise DataError(f"data file '{datafile.relpath}' does not exist", "check the path (relative paths in a task YAML are relative to the YAML file)")
    searched: list[Path] = []
    for root in ([base] if base else []) + [cache_dir()]:
        for p in _candidates(datafile, root):
            if p.is_file():
                return verify(p, datafile)
        searched.append(root)
    looked = " and ".join(f"'{d}'" for d in searched)
    if base is None:
        put = (f"no data directory was found (set ${DATA_DIR_ENV}, pass data_dir, or run from a directory "
               f"with {DEFAULT_RELATIVE_DATA_DIR}); put the file at <data dir>/{datafile.relpath}")
    else:
        put = f"put it at '{base / datafile.relpath}'"
    if not datafile.url:
        raise DataError(
            f"data file '{datafile.relpath}' is missing (looked in {looked}) and has no download URL",
            put + (f" (sha256 {datafile.sha256})" if datafile.sha256 else ""),
        )
    try:
        return download(datafile, cache_dir(), timeout=timeout)
    except DownloadError as e:  # a checksum mismatch (plain DataError) propagates as is
        raise DataError(
            f"data file '{datafile.relpath}' is missing (looked in {looked}) and downloading it from "
            f"{datafile.url} failed: {e.message}",
            put + f", or download {datafile.url} yourself" + (f" (unpack: {datafile.unpack})" if datafile.unpack else "")
            + (f" (the plain file may also be saved as {_plain_relpath(datafile)})" if _plain_relpath(datafile) else ""),
        ) from None


def download(datafile: DataFile, dest_root: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``datafile.url`` into ``dest_root`` with pooch, unpack, verify, and atomically move
    into place; on any failure nothing is left behind (no file, no temporary, no empty directory)."""
    assert datafile.url is not None
    target = dest_root / datafile.relpath
    created = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the download cache directory '{target.parent}' ({e})",
                        f"set ${CACHE_DIR_ENV} to a writable directory") from None
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.download-") as tmp:
            got = _retrieve(datafile, Path(tmp), timeout)
            if _plain_relpath(datafile) and datafile.unpack is None and not is_gzip(got):
                target = dest_root / _plain_relpath(datafile)  # type: ignore[operator]  # served plain, stored plain
            problem = _check(got, datafile)
            if problem is not None:
                raise _corrupt_download(datafile, problem)
            os.replace(got, target)
            return target
    except BaseException:
        for d in created:  # deepest first: leave no empty directories behind a failed download
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _corrupt_download(datafile: DataFile, problem: str) -> DataError:
    return DataError(
        f"data file '{datafile.relpath}' downloaded from {datafile.url} is corrupt or a different version: {problem}",
        f"nothing was saved; retry later, or obtain the file yourself and put it at <data dir>/{datafile.relpath}",
    )


def _retrieve(datafile: DataFile, tmp: Path, timeout: float) -> Path:
    """``pooch.retrieve`` into ``tmp``: the download, checked against the known hash when the URL
    serves the file itself, unpacked by pooch's Unzip/Decompress processors when it does not (the
    member is then verified by ``_check``, since only the member's checksum is known)."""
    import pooch
    import requests

    pooch.get_logger().setLevel("WARNING")  # no "Downloading ..."/hash notes on stderr
    unpack, processor = datafile.unpack, None
    if unpack == "gzip":
        processor = pooch.Decompress(method="gzip", name="unpacked")
    elif unpack is not None and unpack.startswith("zip:"):
        processor = pooch.Unzip(members=[unpack[len("zip:"):]], extract_dir="unpacked")
    elif unpack is not None:
        raise DataError(f"unknown unpack method '{unpack}' for {datafile.relpath}", "use None, 'gzip' or 'zip:<member>'")
    # Known hash of what the URL serves: only a plain, uncompressed-only file's own sha256.
    known = f"sha256:{datafile.sha256}" if unpack is None and datafile.sha256 and not datafile.content_sha256 else None
    downloader = pooch.HTTPDownloader(timeout=timeout, progressbar=False)
    try:
        out = pooch.retrieve(datafile.url, known_hash=known, fname="download", path=tmp, processor=processor, downloader=downloader)
    except requests.RequestException as e:
        raise DownloadError(f"{type(e).__name__}: {e}") from None
    except zipfile.BadZipFile as e:
        raise DownloadError(f"the download is not a valid zip archive ({e})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DownloadError(f"cannot unpack the download ({type(e).__name__}: {e})") from None
    except ValueError as e:  # pooch: the hash does not match (the download is already deleted)
        if "hash" not in str(e):
            raise DownloadError(f"{type(e).__name__}: {e}") from None
        raise _corrupt_download(datafile, str(e).split(". Deleted")[0]) from None
    if not isinstance(out, list):
        return Path(out)
    member = unpack[len("zip:"):]  # type: ignore[index]
    # Unzip extracts every name that *starts with* the member (directories); take the exact one.
    exact = [Path(p) for p in out if Path(p) == tmp / "unpacked" / member]
    if not exact:
        raise DownloadError(f"the downloaded archive has no member '{member}'")
    return exact[0]


Row = tuple[int, list[str]]  # (1-based line number in the file, columns)


def read_tsv(path: Path, *, header: bool, ncols: int | None = None, label: str | None = None) -> tuple[list[str] | None, list[Row]]:
    """Parse a tab-separated file strictly: every row must have the same number of columns.

    Fields are split on tabs only, with no quote handling: the GLUE/CoLA/HANS files contain
    literal ``"`` characters that a CSV reader would misinterpret. A missing final newline is
    fine; blank lines elsewhere are errors (they usually mean a broken file). Returns the header
    (or None) and the data rows with their line numbers, so callers can report precise errors.
    """
    name = label or str(path)
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    cols: list[str] | None = None
    rows: list[Row] = []
    for i, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        parts = line.split("\t")
        if header and cols is None:
            cols = parts
            if ncols is None:
                ncols = len(cols)
            continue
        if not line.strip():
            raise DataError(f"{name}, line {i}: empty line", "remove blank lines from the file (or restore the original file)")
        if ncols is not None and len(parts) != ncols:
            raise DataError(
                f"{name}, line {i}: expected {ncols} tab-separated columns, found {len(parts)}",
                "the file is malformed (a stray or missing tab?); restore the original file",
            )
        rows.append((i, parts))
    if header and cols is None:
        raise DataError(f"{name}: the file is empty (expected a header row)", "restore the original file")
    return cols, rows

