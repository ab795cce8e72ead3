"""CIFAR pickles are read by a restricted unpickler: data loads, code in a data file never runs."""

from __future__ import annotations

import builtins
import json
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cl_bench.cifar_layout import layout
from cl_bench.cli import main
from cl_bench.errors import DataError
from scenarios.cifar_files import write_cifar
from scenarios.split_cifar import _unpickle, load_cifar


def _plain_load(path: Path) -> dict[str, Any]:
    """What the loader used to do (trusted here: the files are the test's own)."""
    with path.open("rb") as fh:
        return pickle.load(fh, encoding="latin1")


def _files(folder: Path, variant: str) -> list[Path]:
    lay = layout(variant)
    return [folder / name for name, _ in (lay.meta_file, *lay.train_files, *lay.test_files)]


def _assert_same_entry(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert isinstance(got[key], np.ndarray)
            assert got[key].dtype == value.dtype
            assert np.array_equal(got[key], value)
        else:
            assert got[key] == value


def _expected_arrays(folder: Path, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lay = layout(variant)
    train = [_plain_load(folder / name) for name, _ in lay.train_files]
    test = [_plain_load(folder / name) for name, _ in lay.test_files]
    return (
        np.concatenate([e["data"] for e in train]).reshape(-1, 3, 32, 32),
        np.concatenate([e[lay.label_key] for e in train]),
        np.concatenate([e["data"] for e in test]).reshape(-1, 3, 32, 32),
        np.concatenate([e[lay.label_key] for e in test]),
    )


def _assert_loads_as_before(root: Path, folder: Path, variant: str) -> None:
    train, test, names = load_cifar(root, variant, verify_checksums=False)
    train_x, train_y, test_x, test_y = _expected_arrays(folder, variant)
    assert np.array_equal(train.images.numpy(), train_x)
    assert np.array_equal(train.targets.numpy(), train_y)
    assert np.array_equal(test.images.numpy(), test_x)
    assert np.array_equal(test.targets.numpy(), test_y)
    meta = _plain_load(folder / layout(variant).meta_file[0])
    assert names == [n.replace("_", " ") for n in meta[layout(variant).names_key]]


@pytest.mark.parametrize("variant", ["cifar100", "cifar10"])
def test_generated_files_load_exactly_as_with_plain_pickle(tmp_path, variant: str) -> None:
    folder = write_cifar(tmp_path, variant, n_train=100, n_test=100 if variant == "cifar100" else 10)
    for path in _files(folder, variant):
        _assert_same_entry(_unpickle(path), _plain_load(path))
    _assert_loads_as_before(tmp_path, folder, variant)


def _py2_cpickle(entry: dict[str, Any]) -> bytes:
    """The bytes Python 2's ``cPickle.dump(entry, fh, 2)`` writes with numpy 1, as in torchvision's
    files: str (keys, names, the pixel buffer) as BINSTRING, ints as BININT*, numpy's reconstructor
    under ``numpy.core.multiarray``, the dtype with its version-3 state, no ``_codecs``."""
    out = bytearray(b"\x80\x02")

    def text(value: str | bytes) -> None:
        raw = value.encode("latin1") if isinstance(value, str) else value
        out.extend(b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)))
        out.extend(raw)

    def integer(value: int) -> None:
        if 0 <= value < 256:
            out.extend(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            out.extend(b"M" + struct.pack("<H", value))
        else:
            out.extend(b"J" + struct.pack("<i", value))

    def array(value: np.ndarray) -> None:
        assert value.dtype == np.uint8
        out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
        integer(0)
        out.extend(b"\x85")  # TUPLE1: shape (0,)
        text("b")
        out.extend(b"\x87R(")  # TUPLE3, REDUCE, MARK of the state tuple
        integer(1)
        out.extend(b"(")
        for dim in value.shape:
            integer(dim)
        out.extend(b"tcnumpy\ndtype\n")
        text("u1")
        integer(0)
        integer(1)
        out.extend(b"\x87R(")
        integer(3)
        text("|")
        out.extend(b"NNN")
        for field in (-1, -1, 0):
            integer(field)
        out.extend(b"tb\x89")  # the dtype's BUILD, then fortran_order=False
        text(value.tobytes())
        out.extend(b"tb")  # the array's BUILD

    def item(value: Any) -> None:
        if isinstance(value, str | bytes):
            text(value)
        elif isinstance(value, int):
            integer(value)
        elif isinstance(value, list):
            out.extend(b"](")
            for element in value:
                item(element)
            out.extend(b"e")
        else:
            array(value)

    out.extend(b"}(")
    for key, value in entry.items():
        text(key)
        item(value)
    out.extend(b"u.")
    return bytes(out)


@pytest.mark.parametrize("variant", ["cifar100", "cifar10"])
def test_python2_era_files_like_torchvisions_load(tmp_path, variant: str) -> None:
    folder = write_cifar(tmp_path, variant, n_train=100, n_test=100 if variant == "cifar100" else 10)
    originals = {path: _plain_load(path) for path in _files(folder, variant)}
    for path, entry in originals.items():
        path.write_bytes(_py2_cpickle(entry))
        _assert_same_entry(_plain_load(path), entry)  # the emulation is a faithful pickle
        assert b"_codecs" not in path.read_bytes()
    assert (
        b"cnumpy.core.multiarray\n_reconstruct\n" in (folder / layout(variant).test_files[0][0]).read_bytes()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 warns on a numpy.core import; none happens
        for path, entry in originals.items():
            _assert_same_entry(_unpickle(path), entry)
    _assert_loads_as_before(tmp_path, folder, variant)


def test_numpy_scalars_load(tmp_path) -> None:
    path = tmp_path / "meta"
    entry = {"label_names": ["a", "b"], "num_vis": np.int64(3072), "scale": np.float32(0.5)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps(entry, protocol=protocol))
        got = _unpickle(path)
        assert got == entry
        assert type(got["num_vis"]) is np.int64


class _TouchOnLoad:
    """Unpickled by plain pickle, this creates ``marker``: a stand-in for any code a file could run."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "exec":
            return (builtins.exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))
        return (Path.touch, (self.marker,))


PAYLOADS = [
    ("touch", 2, "__builtin__.getattr"),
    ("touch", 4, "pathlib.Path.touch"),
    ("exec", 2, "__builtin__.exec"),
]
PAYLOADS += [("exec", 4, "builtins.exec")]


@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize(("how", "protocol", "refused"), PAYLOADS)
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(
    tmp_path, target: str, how: str, protocol: int, refused: str
) -> None:
    folder = write_cifar(tmp_path / "data", "cifar10", n_train=20, n_test=10)
    path = folder / target
    entry = _plain_load(path)
    marker = tmp_path / "ran"
    entry["filenames" if target == "data_batch_1" else "label_names"] = [_TouchOnLoad(marker, how)]
    payload = pickle.dumps(entry, protocol=protocol)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_TouchOnLoad(control, how), protocol=protocol))
    assert control.exists()  # the payload is live: plain pickle.load (the old loader) runs it
    path.write_bytes(payload)
    with pytest.raises(DataError) as err:
        load_cifar(tmp_path / "data", "cifar10", verify_checksums=False)
    assert str(err.value) == (
        f"{path}: refused to load: the pickle asks for {refused}, which a CIFAR file never holds "
        "(loading data never runs code)"
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
        ("__builtin__", "eval"),
        ("builtins", "getattr"),
        ("subprocess", "Popen"),
        ("numpy", "load"),
        ("numpy.core.multiarray", "_reconstructor"),
        ("copy_reg", "_reconstructor"),
    ],
)
def test_any_other_global_is_refused_by_name(tmp_path, module: str, name: str) -> None:
    path = tmp_path / "meta"
    path.write_bytes(f"c{module}\n{name}\n(Vtouch {tmp_path / 'ran'}\ntR.".encode())
    with pytest.raises(DataError) as err:
        _unpickle(path)
    assert str(err.value) == (
        f"{path}: refused to load: the pickle asks for {module}.{name}, which a CIFAR file never holds "
        "(loading data never runs code)"
    )
    assert not (tmp_path / "ran").exists()


def test_a_refused_name_stays_on_one_line(tmp_path) -> None:
    path = tmp_path / "meta"
    path.write_bytes(b"\x80\x04\x8c\x02os\x8c\x08sys\ntem\n\x93.")  # STACK_GLOBAL takes any str
    with pytest.raises(DataError, match="refused to load: the pickle asks for 'os.sys\\\\ntem\\\\n'") as err:
        _unpickle(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("encoding", ["zlib", "rot13", "utf-8"])
def test_codecs_encode_only_turns_latin1_text_into_bytes(tmp_path, encoding: str) -> None:
    path = tmp_path / "meta"
    path.write_bytes(f"c_codecs\nencode\n(Vabc\nV{encoding}\ntR.".encode())
    with pytest.raises(DataError, match="not a readable CIFAR pickle .*only allowed to turn latin-1 text"):
        _unpickle(path)
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVlatin1\ntR.")
    with pytest.raises(DataError, match="holds a bytes, expected a dict"):
        _unpickle(path)


def test_the_cli_refuses_a_code_carrying_file_with_one_error_line_and_no_record(capsys, tmp_path) -> None:
    data = tmp_path / "data"
    folder = write_cifar(data, "cifar10", n_train=20, n_test=10)
    marker = tmp_path / "ran"
    entry = _plain_load(folder / "data_batch_1")
    entry["filenames"] = [_TouchOnLoad(marker, "touch")]
    (folder / "data_batch_1").write_bytes(pickle.dumps(entry, protocol=4))
    runs = tmp_path / "runs"
    args = ["run", "--no-progress", "--out", str(runs), "--run-id", "x", "--strategy", "lora"]
    args += ["--scenario", "split-cifar10", "--backbone", "tiny-clip", "--set", "steps_per_experience=1"]
    args += ["--set", f"scenario.root={data}", "--set", "scenario.verify_checksums=false"]
    code = main(args)
    _, err = capsys.readouterr()
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {folder / 'data_batch_1'}: refused to load: the pickle asks for pathlib.Path.touch, "
        "which a CIFAR file never holds (loading data never runs code)"
    ], err
    assert not marker.exists()
    records = [json.loads(p.read_text()) for p in runs.rglob("result.json")] if runs.exists() else []
    assert not [r for r in records if r.get("status") == "ok"]
