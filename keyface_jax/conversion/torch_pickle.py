"""Read ``torch.save`` files without importing torch and without running foreign code.

A torch checkpoint is a pickle whose tensors point at raw storages kept next to
it (zip format, torch >= 1.6) or after it (legacy format). ``pickle.load`` would
import and call whatever globals the file names, so we unpickle with an explicit
allow-list: every global outside it is refused with :class:`CheckpointError`
(or, on request, replaced by an inert stand-in that is never called).

Tensors come back as :class:`LazyTensor`; their bytes are read only when
:meth:`LazyTensor.materialize` is called, so optimizer states and other
entries nobody asks for are never read into memory.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import pickle
import zipfile
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, unsafe to load, or holds no tensors."""


# torch dtype name (as pickled, plus aliases) -> numpy dtype.
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dt)
    for name, dt in {
        "float32": np.float32, "float": np.float32, "float64": np.float64,
        "double": np.float64, "float16": np.float16, "half": np.float16,
        "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "long": np.int64,
        "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
        "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
        "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64,
        "cfloat": np.complex64, "complex128": np.complex128, "cdouble": np.complex128,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
        "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
        "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    }.items()
}

# Legacy typed storage classes torch.save still emits -> element dtype name.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

_CHUNK = 64 << 20  # bytes per read when copying a storage out of the zip
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save file


class TorchDType:
    """Stand-in for a pickled ``torch.<dtype>`` object (e.g. inside hyper-parameters)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.numpy = _DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class; only used to tag persistent ids."""

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name, self.dtype = name, dtype


class _Storage:
    """One saved storage; bytes are read on first use and cached until the file closes."""

    def __init__(self, source: str, key: str, dtype: np.dtype, nbytes: int,
                 read: Callable[[], np.ndarray]) -> None:
        self.source, self.key, self.dtype, self.nbytes = source, key, dtype, nbytes
        self._read = read
        self._bytes: np.ndarray | None = None
        self.claimed = False  # set once a tensor took the whole buffer without a copy

    def as_dtype(self, dtype: np.dtype) -> np.ndarray:
        if self._bytes is None:
            raw = self._read()
            if raw.nbytes != self.nbytes:
                raise CheckpointError(
                    f"{self.source}: storage {self.key!r} holds {raw.nbytes} bytes, "
                    f"the pickle says {self.nbytes}")
            self._bytes = raw
        usable = self._bytes.nbytes - self._bytes.nbytes % dtype.itemsize
        return self._bytes[:usable].view(dtype)

    def release(self) -> None:
        self._bytes = None


class LazyTensor:
    """A tensor found in the pickle: a strided view into a storage, not yet read."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...], dtype: np.dtype) -> None:
        self.storage, self.offset, self.shape, self.stride, self.dtype = (
            storage, offset, shape, stride, dtype)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"

    def materialize(self) -> np.ndarray:
        """Return a C-contiguous array that owns (or solely uses) its memory."""
        with _guard(self.storage.source):
            return self._materialize()

    def _materialize(self) -> np.ndarray:
        src = self.storage.source
        if math.prod(self.shape) == 0:
            return np.empty(self.shape, self.dtype)
        flat = self.storage.as_dtype(self.dtype)
        # Strides come from the file: check bounds before as_strided, which does not.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
            raise CheckpointError(
                f"{src}: tensor view (offset {self.offset}, shape {self.shape}, stride "
                f"{self.stride}) reaches outside storage {self.storage.key!r} "
                f"of {flat.size} elements")
        c_stride = tuple(int(math.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        whole = self.offset == 0 and math.prod(self.shape) == flat.size
        if whole and self.stride == c_stride and not self.storage.claimed:
            # Common case: the tensor is its whole storage. Hand the buffer out once.
            self.storage.claimed = True
            return flat.reshape(self.shape)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], self.shape, [s * flat.itemsize for s in self.stride],
            writeable=False)
        return np.array(view, order="C", copy=True)


# ---- allow-listed callables: our own safe re-implementations ------------------------

def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"tensor {what} is not a tuple of ints: {value!r}")
    return tuple(value)


def _make_tensor(storage: Any, offset: Any, size: Any, stride: Any,
                 dtype: np.dtype | None) -> LazyTensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuilt from a non-storage {type(storage).__name__}")
    if not isinstance(offset, int):
        raise CheckpointError(f"tensor storage offset is not an int: {offset!r}")
    shape, strides = _check_int_tuple(size, "size"), _check_int_tuple(stride, "stride")
    if len(shape) != len(strides) or min(shape, default=0) < 0:
        raise CheckpointError(f"bad tensor shape {shape} / stride {strides}")
    return LazyTensor(storage, offset, shape, strides, dtype or storage.dtype)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    # v1 and v2 differ only in trailing requires_grad / hooks / metadata, which we drop.
    return _make_tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_):
    # torch writes v3 (untyped storage + explicit dtype) for dtypes without a *Storage class.
    if not isinstance(dtype, TorchDType):
        raise CheckpointError(f"tensor dtype is not a torch dtype: {dtype!r}")
    return _make_tensor(storage, offset, size, stride, dtype.numpy)


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, LazyTensor):
        raise CheckpointError(f"Parameter rebuilt from a non-tensor {type(data).__name__}")
    return data


_TENSOR_CLASSES = (object(), object())  # markers for torch.Tensor, torch.nn.Parameter
_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensors carrying Python attributes; keep the tensor, drop type and attributes.
    if func not in _REBUILDERS or new_type not in _TENSOR_CLASSES or not isinstance(args, tuple):
        raise CheckpointError("unsupported tensor subclass reconstruction")
    return func(*args)


def _torch_size(dims=()):
    return _check_int_tuple(dims, "torch.Size")


def _torch_device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise CheckpointError(f"bad torch.device arguments {args!r}")
    return ":".join(str(a) for a in args)


def _codecs_encode(text, encoding="utf-8", *_):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CheckpointError(f"_codecs.encode called with unexpected {encoding!r}")
    return text.encode(encoding)


def _np_dtype(spec, *_flags):
    dtype = np.dtype(spec) if isinstance(spec, str) else None
    if dtype is None or dtype.hasobject:
        raise CheckpointError(f"refusing numpy dtype {spec!r}")
    return dtype


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise CheckpointError("refusing numpy scalar that is not plain data")
    return np.frombuffer(data, dtype, count=1)[0]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR_CLASSES[0],
    ("torch.nn.parameter", "Parameter"): _TENSOR_CLASSES[1],
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
}
for _mod in ("builtins", "__builtin__"):  # plain data constructors only
    for _cls in (set, frozenset, slice, bytearray, complex):
        _ALLOWED[(_mod, _cls.__name__)] = _cls
for _name, _dt in _STORAGE_DTYPES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_name, _DTYPES[_dt])
for _name in _DTYPES:
    _ALLOWED[("torch", _name)] = TorchDType(_name)


class Opaque:
    """Inert stand-in for a global outside the allow-list (stub mode).

    It records what the pickle tried to do with it and never calls the real
    object, so loading stays free of foreign code; the result is simply unusable.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualname}>"


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str, stub_unknown: bool,
                 storage: Callable[[tuple], _Storage] | None) -> None:
        super().__init__(file, encoding="utf-8")
        self._source, self._stub, self._storage = source, stub_unknown, storage
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        qualname = f"{module}.{name}"
        if not self._stub:
            raise CheckpointError(
                f"{self._source} needs arbitrary code to load (global {qualname!r}); refusing")
        if qualname not in self._stubs:
            self._stubs[qualname] = type("Opaque", (Opaque,), {"qualname": qualname})
        return self._stubs[qualname]

    def persistent_load(self, pid: Any) -> Any:
        if self._storage is None or not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r:.80}")
        return self._storage(pid)


def _storage_meta(source: str, pid: tuple) -> tuple[str, np.dtype, int]:
    """(key, dtype, nbytes) of a ('storage', type, key, location, numel, ...) id."""
    if len(pid) < 5 or not isinstance(pid[1], _StorageType) or not isinstance(pid[4], int):
        raise CheckpointError(f"{source}: malformed storage reference {pid!r:.80}")
    stype = pid[1]
    return str(pid[2]), stype.dtype, pid[4] * stype.dtype.itemsize


def _read_zip_entry(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    info = zf.getinfo(name)
    buf = np.empty(info.file_size, np.uint8)
    view = memoryview(buf)
    with zf.open(info) as src:  # reading to the end also verifies the CRC
        pos = 0
        while pos < info.file_size:
            got = src.readinto(view[pos:pos + _CHUNK])
            if not got:
                raise CheckpointError(f"storage record {name!r} is truncated")
            pos += got
    return buf


def _load_zip(path: str, zf: zipfile.ZipFile, stub: bool, storages: list[_Storage]) -> Any:
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(f"{path}: zip archive without a single <name>/data.pkl; "
                              "not a torch.save checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    names = set(zf.namelist())
    if prefix + "constants.pkl" in names:
        raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a "
                              "torch.save checkpoint; export its state_dict instead")
    if prefix + "byteorder" in names and zf.read(prefix + "byteorder") != b"little":
        raise CheckpointError(f"{path}: big-endian torch archives are not supported")
    by_key: dict[str, _Storage] = {}

    def storage(pid: tuple) -> _Storage:
        key, dtype, nbytes = _storage_meta(path, pid)
        if key not in by_key:
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise CheckpointError(f"{path}: storage record {entry!r} is missing")
            by_key[key] = _Storage(path, key, dtype, nbytes,
                                   lambda: _read_zip_entry(zf, entry))
            storages.append(by_key[key])
        return by_key[key]

    with zf.open(pkl[0]) as f:
        return _Unpickler(f, path, stub, storage).load()


def _load_legacy(path: str, f: Any, stub: bool, storages: list[_Storage]) -> Any:
    """Pre-1.6 format: magic, version, sys_info, main pickle, storage keys, raw storages."""
    header = _Unpickler(f, path, False, None)
    if header.load() != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: a pickle, but not a torch.save checkpoint")
    header.load()
    sys_info = header.load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointError(f"{path}: big-endian torch checkpoints are not supported")
    by_key: dict[str, _Storage] = {}
    spans: dict[str, tuple[int, int]] = {}

    def read(key: str) -> np.ndarray:
        start, nbytes = spans[key]
        f.seek(start)
        buf = np.empty(nbytes, np.uint8)
        if f.readinto(memoryview(buf)) != nbytes:
            raise CheckpointError(f"{path}: storage {key!r} is truncated")
        return buf

    def storage(pid: tuple) -> _Storage:
        key, dtype, nbytes = _storage_meta(path, pid)
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointError(f"{path}: legacy storage views are not supported")
        if key not in by_key:
            by_key[key] = _Storage(path, key, dtype, nbytes, lambda: read(key))
            storages.append(by_key[key])
        return by_key[key]

    obj = _Unpickler(f, path, stub, storage).load()
    keys = _Unpickler(f, path, False, None).load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{path}: legacy storage key list is malformed")
    pos = f.tell()
    for key in keys:  # each storage: int64 element count, then its bytes
        f.seek(pos)
        count = int.from_bytes(f.read(8), "little")
        if key not in by_key:
            raise CheckpointError(f"{path}: storage {key!r} listed but never referenced")
        spans[key] = (pos + 8, count * by_key[key].dtype.itemsize)
        pos += 8 + spans[key][1]
    if f.seek(0, os.SEEK_END) < pos:
        raise CheckpointError(f"{path}: file is truncated (storages end past EOF)")
    return obj


_FORMAT_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                  IndexError, KeyError, zipfile.BadZipFile, OSError, MemoryError,
                  OverflowError, RecursionError)


@contextlib.contextmanager
def _guard(src: str) -> Iterator[None]:
    """Turn low-level failures while decoding ``src`` into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError as e:
        if str(e).startswith(src):
            raise
        raise CheckpointError(f"{src}: {e}") from e  # checks deep inside name no file
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{src}: truncated or corrupt zip archive ({e})") from e
    except _FORMAT_ERRORS as e:
        raise CheckpointError(
            f"{src}: corrupt or unsupported torch checkpoint ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def open_torch_checkpoint(path: str | os.PathLike, *,
                          stub_unknown_globals: bool = False) -> Iterator[Any]:
    """Yield the unpickled object of a ``torch.save`` file, tensors as :class:`LazyTensor`.

    Tensors can be materialized only inside the ``with`` block (the file stays
    open until then). Globals outside the allow-list raise :class:`CheckpointError`
    unless ``stub_unknown_globals``, which turns them into inert :class:`Opaque`.
    """
    src = os.fspath(path)
    storages: list[_Storage] = []
    with contextlib.ExitStack() as stack:
        try:
            with _guard(src):
                f = stack.enter_context(open(src, "rb"))
                head = f.read(4)
                f.seek(0)
                if not head:
                    raise CheckpointError(f"{src}: file is empty")
                if head.startswith(b"PK"):
                    zf = stack.enter_context(zipfile.ZipFile(f))
                    obj = _load_zip(src, zf, stub_unknown_globals, storages)
                elif head[0] == 0x80:  # pickle protocol marker: maybe the legacy format
                    obj = _load_legacy(src, f, stub_unknown_globals, storages)
                else:
                    raise CheckpointError(f"{src}: not a PyTorch checkpoint "
                                          "(neither a torch zip archive nor a pickle)")
            yield obj  # errors raised by the caller's block pass through unchanged
        finally:
            for s in storages:
                s.release()
