"""numpy/cupy dispatch, host/device placement, the GPU cluster and the ``--device cuda`` errors.

Three kinds of test:

- backend-agnostic checks on the ``xp`` fixture: numpy always, cupy on a machine with a GPU
  (marker ``gpu``; skipped with the reason elsewhere);
- the dispatch and placement decisions on the CPU, with a stand-in class whose module is
  ``cupy`` and with CuPy made unimportable;
- the whole ``device="cuda"`` pipeline on the CPU against a strict stand-in for CuPy: numpy
  arrays that, like cupy arrays, refuse to mix with host arrays and must not reach a Zarr write.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import blocks
from lplr_dask.backend import (
    array_namespace,
    check_device,
    device_of,
    is_cupy,
    like,
    to_device,
    to_host,
    to_host_blocks,
)
from lplr_dask.errors import LplrValueError
from lplr_dask.gpu_cluster import PinnedGPUCluster, gpu_local_cluster, visible_gpus, worker_environments
from lplr_dask.quantize import dequantize, expand_groups, parse_quantizer, quantize
from lplr_dask.sketch import STREAM_S, sketch_matrix, sketch_rows

PIP_HINT = 'pip install "lplr-dask[gpu]"'


# ---------------------------------------------------------------------------------------------
# A strict stand-in for CuPy
# ---------------------------------------------------------------------------------------------


class ndarray(np.ndarray):  # noqa: N801 - named like cupy.ndarray, which pickling looks up
    """A numpy array posing as a cupy array: its type's module is ``cupy``, it has ``.get()``,
    and it refuses operands that are host (numpy) arrays, as CuPy does."""

    __module__ = "cupy"
    gets = 0  # how many device-to-host copies were made

    def get(self) -> np.ndarray:
        type(self).gets += 1
        return self.view(np.ndarray).copy()

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        _refuse_host(inputs)
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"])
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **kwargs))

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        _refuse_host(args)
        _refuse_host(tuple(kwargs.values()))
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))


def _refuse_host(values: Any) -> None:
    for v in values:
        if isinstance(v, (list, tuple)):
            _refuse_host(v)
        elif isinstance(v, np.ndarray) and not isinstance(v, ndarray) and v.ndim > 0:
            raise TypeError(f"a host numpy array {v.shape} meets a device array (CuPy refuses this)")


def _unwrap(x: Any) -> Any:
    if isinstance(x, ndarray):
        return x.view(np.ndarray)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return _each(_unwrap, x)


def _wrap(x: Any) -> Any:
    if isinstance(x, np.ndarray) and not isinstance(x, ndarray):
        return x.view(ndarray)
    return _each(_wrap, x)


def _each(f: Any, x: Any) -> Any:
    """``f`` over a list or tuple (named tuples such as numpy's QRResult kept), else ``x``."""
    if isinstance(x, list):
        return [f(v) for v in x]
    if isinstance(x, tuple):
        values = [f(v) for v in x]
        return type(x)(*values) if hasattr(x, "_fields") else tuple(values)
    return x


def _fake_cupy_module(device_count: Any = 1) -> types.ModuleType:
    """A module named ``cupy`` whose functions are numpy's on :class:`ndarray` stand-ins."""
    mod = types.ModuleType("cupy")
    mod.ndarray = ndarray

    def asarray(x: Any, dtype: Any = None) -> ndarray:
        return np.asarray(_unwrap(x), dtype=dtype).view(ndarray)

    def get_count() -> int:
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    def module_getattr(name: str) -> Any:
        f = getattr(np, name)
        if isinstance(f, type) or not callable(f):
            return f

        def call(*args: Any, **kwargs: Any) -> Any:
            _refuse_host(args)
            return _wrap(f(*_unwrap(args), **_unwrap(kwargs)))

        return call

    mod.asarray = asarray
    mod.asnumpy = lambda x, **_: x.get()
    mod.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count))
    mod.__getattr__ = module_getattr
    return mod


class _CSCMatrix:
    """``cupyx.scipy.sparse.csc_matrix`` of the stand-in: built from and multiplying device arrays."""

    def __init__(self, arg: tuple[Any, ...], shape: tuple[int, int]):
        import scipy.sparse

        _refuse_host(arg)
        assert all(isinstance(v, ndarray) for v in arg), "cupyx sparse matrices are built from device arrays"
        self._m = scipy.sparse.csc_matrix(_unwrap(arg), shape=shape)

    def __getitem__(self, key: Any) -> _CSCMatrix:
        part = object.__new__(_CSCMatrix)
        part._m = self._m[key]
        return part

    def __matmul__(self, other: Any) -> Any:
        _refuse_host((other,))
        return _wrap(self._m @ _unwrap(other))


def _fake_cupyx_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in ("cupyx", "cupyx.scipy", "cupyx.scipy.sparse")}
    mods["cupyx"].scipy = mods["cupyx.scipy"]
    mods["cupyx.scipy"].sparse = mods["cupyx.scipy.sparse"]
    mods["cupyx.scipy.sparse"].csc_matrix = _CSCMatrix
    return mods


@pytest.fixture
def fake_cupy(monkeypatch):
    """``import cupy`` gives the strict stand-in; dask's cupy registrations are undone after.

    Dask and distributed register their cupy functions lazily, on the first cupy-typed object
    they meet; the stand-in must not use up those registrations for the real CuPy.
    """
    import gc

    import dask.array.backends  # noqa: F401 - registers the lazy cupy lookups we save
    from dask.utils import Dispatch

    dispatchers = [o for o in gc.get_objects() if isinstance(o, Dispatch) and {"cupy", "cupyx"} & set(o._lazy)]
    saved = [(d, dict(d._lookup), dict(d._lazy)) for d in dispatchers]
    mod = _fake_cupy_module()
    monkeypatch.setitem(sys.modules, "cupy", mod)
    for name, sub in _fake_cupyx_modules().items():
        monkeypatch.setitem(sys.modules, name, sub)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ndarray.gets = 0
    yield mod
    for d, lookup, lazy in saved:
        d._lookup.clear()
        d._lookup.update(lookup)
        d._lazy.clear()
        d._lazy.update(lazy)


@pytest.fixture
def no_cupy(monkeypatch):
    """CuPy made unimportable (``import cupy`` raises ImportError)."""
    monkeypatch.setitem(sys.modules, "cupy", None)


def _device_for(xp: types.ModuleType) -> str:
    return "cpu" if xp is np else "cuda"


# ---------------------------------------------------------------------------------------------
# Backend-agnostic checks: numpy always, cupy with a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paper", "channel", "group64-sym"])
def test_quantize_round_trip_on_backend(xp, name):
    spec = parse_quantizer(name)
    x_host = np.random.default_rng(0).standard_normal((300, 40))
    q = quantize(xp.asarray(x_host), 4, spec=spec)
    assert isinstance(q.codes, xp.ndarray)
    # min, max, subtraction, division and rint are exact in IEEE arithmetic on either device
    np.testing.assert_array_equal(to_host(q.codes), quantize(x_host, 4, spec=spec).codes)
    g = spec.group_size
    back = to_host(dequantize(q, dtype=np.float64, group_size=g))
    step = to_host(expand_groups(q.scale, x_host.shape, g, 1))
    assert np.all(np.abs(back - x_host) <= step / 2 * (1 + 1e-9))


def test_stochastic_rounding_on_backend(xp):
    x_host = np.random.default_rng(1).standard_normal((200, 30))
    q = quantize(xp.asarray(x_host), 3, spec="tensor-stochastic", seed=5)
    ref = quantize(x_host, 3, spec="tensor-stochastic", seed=5)
    # the uniforms are drawn on the host from the seed, so the device gives the host's codes
    np.testing.assert_array_equal(to_host(q.codes), ref.codes)
    t = (x_host - to_host(q.offset)) / to_host(q.scale)
    assert np.all((ref.codes == np.floor(t)) | (ref.codes == np.ceil(t)))


def test_gptq_rounding_on_backend(xp):
    rng = np.random.default_rng(3)
    L = rng.standard_normal((100, 12)) @ (np.eye(12) + 0.5)  # correlated columns
    W_host = rng.standard_normal((12, 40))
    q = quantize(xp.asarray(W_host), 3, spec="tensor-gptq", channel_axis=0, hessian=L.T @ L)
    assert isinstance(q.codes, xp.ndarray)
    # one elementwise operation per kernel (no fused multiply-add): IEEE arithmetic gives the
    # host's codes on either device
    np.testing.assert_array_equal(
        to_host(q.codes), quantize(W_host, 3, spec="tensor-gptq", channel_axis=0, hessian=L.T @ L).codes
    )


def test_sketch_rows_on_backend(xp):
    ref = sketch_matrix(3, STREAM_S, 9000, 7, scale=0.5)
    rows = sketch_rows(3, STREAM_S, 1000, 9000, 7, scale=0.5, xp=xp)
    assert isinstance(rows, xp.ndarray)
    # generated on the host: CPU and GPU runs share one S
    np.testing.assert_array_equal(to_host(rows), ref[1000:])
    unscaled = sketch_rows(3, STREAM_S, 100, 5000, 7, xp=xp)
    unscaled[...] = 0  # a caller's copy: the cached blocks must not change
    np.testing.assert_array_equal(to_host(sketch_rows(3, STREAM_S, 100, 5000, 7, xp=xp)), 2 * ref[100:5000])


def test_thin_products_follow_the_device_of_a(xp):
    rng = np.random.default_rng(2)
    A_host, PT_host, M_host = rng.standard_normal((90, 70)), rng.standard_normal((90, 4)), rng.standard_normal((70, 3))
    A = to_device(da.from_array(A_host, chunks=(40, 30)), _device_for(xp))
    PT, M = da.from_array(PT_host, chunks=(45, 4)), da.from_array(M_host, chunks=(70, 3))
    left = blocks.left_multiply(PT, A).compute()
    right = blocks.right_multiply(A, M).compute()
    assert isinstance(left, xp.ndarray) and isinstance(right, xp.ndarray)
    np.testing.assert_allclose(to_host(left), PT_host.T @ A_host, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_host(right), A_host @ M_host, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("passes", "power_iters"), [(2, 0), (1, 0), (2, 1)])
def test_compress_on_backend_matches_cpu(xp, client, small_matrix, tmp_path, passes, power_iters):
    device = _device_for(xp)
    kw = dict(rank=8, bits=(6, 6), passes=passes, power_iters=power_iters, seed=4)
    f_dev = lplr_dask.compress(small_matrix, tmp_path / "dev.lplr.zarr", device=device, **kw)
    f_cpu = lplr_dask.compress(small_matrix, tmp_path / "cpu.lplr.zarr", device="cpu", **kw)
    assert f_dev.attrs["device"] == device
    e_dev, e_cpu = lplr_dask.evaluate(small_matrix, f_dev), lplr_dask.evaluate(small_matrix, f_cpu)
    # the same S (drawn on the host); only rounding in the device's GEMMs differs: the design
    # allows the errors to differ by 2% (a code flipped at a rounding boundary moves them ~1e-6)
    assert abs(e_dev - e_cpu) <= 0.02 * e_cpu
    # the exact error with A resident on the device streams the factors to it
    assert lplr_dask.evaluate(to_device(small_matrix, device), f_dev) == pytest.approx(e_dev, rel=1e-9)
    if xp is np:
        for name in ("L/codes", "R/codes"):
            np.testing.assert_array_equal(f_dev._group[name][...], f_cpu._group[name][...])


# ---------------------------------------------------------------------------------------------
# Dispatch and placement decisions, on the CPU
# ---------------------------------------------------------------------------------------------


def test_dispatch_from_the_chunk_type(fake_cupy):
    host = np.arange(6.0).reshape(2, 3)
    dev = host.view(ndarray)
    assert not is_cupy(host) and device_of(host) == "cpu" and array_namespace(host) is np
    assert is_cupy(dev) and device_of(dev) == "cuda" and array_namespace(dev) is fake_cupy
    dev_blocks = da.from_array(host, chunks=(1, 3)).map_blocks(fake_cupy.asarray, meta=dev[:0, :0])
    assert is_cupy(dev_blocks) and device_of(dev_blocks) == "cuda"
    # a dask array computes with numpy's functions, which dispatch to dask
    assert array_namespace(dev_blocks) is np


def test_to_host():
    host = np.ones((2, 2))
    assert to_host(host) is host
    dev = host.view(ndarray)
    out = to_host(dev)
    assert type(out) is np.ndarray and out is not host
    np.testing.assert_array_equal(out, host)


def test_to_host_blocks(fake_cupy):
    A = da.from_array(np.arange(12.0).reshape(3, 4), chunks=(2, 2))
    assert to_host_blocks(A) is A  # nothing to move, no extra task
    on_host = to_host_blocks(to_device(A, "cuda"))
    assert type(on_host._meta) is np.ndarray
    assert all(type(b) is np.ndarray for b in dask.compute(*on_host.to_delayed().ravel(), scheduler="sync"))
    np.testing.assert_array_equal(on_host.compute(scheduler="sync"), A.compute())


def test_to_device_and_like(fake_cupy):
    A = da.from_array(np.arange(12.0).reshape(3, 4), chunks=(2, 2))
    assert to_device(A, "cpu") is A
    dev = to_device(A, "cuda")
    assert is_cupy(dev) and dev.dtype == A.dtype
    assert to_device(dev, "cuda") is dev
    assert all(type(b) is ndarray for b in dask.compute(*dev.to_delayed().ravel(), scheduler="sync"))
    X = da.ones((4, 2), chunks=2)
    assert like(X, A) is X
    assert is_cupy(like(X, dev))
    assert not is_cupy(like(like(X, dev), A))
    np.testing.assert_array_equal(to_device(dev, "cpu").compute(scheduler="sync"), A.compute())


def test_unknown_device():
    with pytest.raises(LplrValueError, match="Expected device 'cpu' or 'cuda'. Got 'tpu'"):
        check_device("tpu")
    check_device("cpu")  # never needs CuPy


def test_cuda_without_cupy_names_the_extra(no_cupy, small_matrix):
    with pytest.raises(LplrValueError, match="needs CuPy, which is not installed") as e:
        to_device(small_matrix, "cuda")
    assert PIP_HINT in str(e.value)


@pytest.mark.parametrize(
    ("count", "message"),
    [(0, "CuPy sees no CUDA GPU"), (RuntimeError("cudaErrorNoDevice"), "no CUDA GPU is usable \\(RuntimeError")],
)
def test_cuda_without_a_gpu_names_the_extra(monkeypatch, count, message):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy_module(count))
    with pytest.raises(LplrValueError, match=message) as e:
        check_device("cuda")
    assert PIP_HINT in str(e.value)


def test_compress_cuda_without_cupy_fails_before_writing(no_cupy, small_matrix, tmp_store):
    with pytest.raises(LplrValueError, match="needs CuPy"):
        lplr_dask.compress(small_matrix, tmp_store, rank=4, device="cuda")
    assert not os.path.exists(tmp_store)


def test_cli_device_cuda_without_cupy(no_cupy, tmp_path, capsys):
    from lplr_dask.cli import main

    src = tmp_path / "a.zarr"
    zarr.create_array(src, shape=(40, 30), chunks=(20, 30), dtype="float32")[...] = 1.0
    out = tmp_path / "o.lplr.zarr"
    status = main(["compress", str(src), str(out), "--rank", "2", "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: --device cuda needs CuPy")
    assert PIP_HINT in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The device="cuda" pipeline on the strict stand-in
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def guarded_zarr_writes(monkeypatch):
    """Fail any Zarr write of a device array (zarr needs host buffers)."""
    write = zarr.Array.__setitem__

    def checked(self: zarr.Array, key: Any, value: Any) -> None:
        assert not isinstance(value, ndarray), f"a device array reached a Zarr write of {self.path!r}"
        write(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", checked)


@pytest.mark.parametrize(
    "kw",
    [
        dict(passes=2, quantizer="paper"),
        dict(passes=2, quantizer="group48-stochastic", power_iters=1),
        dict(passes=1, quantizer="default"),
        dict(passes=2, quantizer="default", sketch="sparse", rank=12),
        dict(passes=1, quantizer="default", sketch="sparse", rank=12),
    ],
    ids=["two-pass-paper", "power-stochastic", "one-pass", "sparse-sketch", "one-pass-sparse-sketch"],
)
def test_cuda_pipeline_keeps_device_and_host_apart(
    fake_cupy, guarded_zarr_writes, monkeypatch, small_matrix, tmp_path, kw
):
    # in this process with dask's threaded scheduler, where the stand-in module is importable
    monkeypatch.setattr(lplr_dask.api, "_client", lambda *a, **k: contextlib.nullcontext())
    # the device runs the sparse products (cupyx); the host must too for identical codes
    monkeypatch.setattr(lplr_dask.lanes, "KERNEL", "sparse")
    args = dict(rank=8, bits=(4, 6), seed=2) | kw
    f_dev = lplr_dask.compress(small_matrix, tmp_path / "dev.lplr.zarr", device="cuda", **args)
    assert ndarray.gets > 0  # device chunks were made and came back to the host
    f_cpu = lplr_dask.compress(small_matrix, tmp_path / "cpu.lplr.zarr", device="cpu", **args)
    # the stand-in computes with numpy, so the device path must give the CPU path's codes exactly
    for name in ("L/codes", "L/scale", "L/offset", "R/codes", "R/scale", "R/offset"):
        np.testing.assert_array_equal(f_dev._group[name][...], f_cpu._group[name][...], err_msg=name)
    assert f_dev.attrs["error_estimate"] == f_cpu.attrs["error_estimate"]
    err = lplr_dask.evaluate(to_device(small_matrix, "cuda"), f_dev)
    assert err == pytest.approx(lplr_dask.evaluate(small_matrix, f_cpu), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# One worker per GPU
# ---------------------------------------------------------------------------------------------


def test_worker_environments_rotate_the_gpus():
    assert worker_environments(["0", "1", "2"]) == [
        {"CUDA_VISIBLE_DEVICES": "0,1,2"},
        {"CUDA_VISIBLE_DEVICES": "1,2,0"},
        {"CUDA_VISIBLE_DEVICES": "2,0,1"},
    ]
    assert worker_environments(["GPU-a"]) == [{"CUDA_VISIBLE_DEVICES": "GPU-a"}]
    for bad in ([], ["0", "0"]):
        with pytest.raises(LplrValueError, match="Expected distinct GPUs"):
            worker_environments(bad)


def test_visible_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy_module(2))
    assert visible_gpus(environ={}) == ["0", "1"]
    assert visible_gpus(1, environ={}) == ["0"]
    assert visible_gpus(environ={"CUDA_VISIBLE_DEVICES": "GPU-x, GPU-y"}) == ["GPU-x", "GPU-y"]
    with pytest.raises(LplrValueError, match="from 1 to 2 .* Got 3 instead"):
        visible_gpus(3, environ={})


def test_visible_gpus_without_cupy(no_cupy):
    with pytest.raises(LplrValueError, match="needs CuPy") as e:
        visible_gpus()
    assert PIP_HINT in str(e.value)


def test_one_worker_per_gpu_without_dask_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    from distributed import Client

    with gpu_local_cluster(devices=["0", "1"], threads_per_worker=1, memory_limit="1GiB", dashboard_address=":0") as c:
        assert isinstance(c, PinnedGPUCluster)
        with Client(c) as client:
            seen = client.run(lambda dask_worker: (dask_worker.name, os.environ["CUDA_VISIBLE_DEVICES"]))
        assert sorted(seen.values()) == [(0, "0,1"), (1, "1,0")]
        with pytest.raises(LplrValueError, match="one worker per GPU"):
            c.scale(3)


def test_get_client_device_cuda_starts_one_worker_per_gpu(monkeypatch):
    """The embedded default of a ``--device cuda`` run: workers pinned to the GPUs CuPy counts."""
    from lplr_dask.cluster import get_client

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy_module(2))
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lines: list[str] = []
    with get_client(device="cuda", threads_per_worker=1, memory_limit="1GiB", log=lines.append) as client:
        seen = client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
    assert sorted(seen.values()) == ["0,1", "1,0"]
    assert any(line.startswith("Dask dashboard:") for line in lines)


@pytest.mark.gpu
def test_gpu_cluster_workers_see_their_gpu():
    pytest.importorskip("cupy")
    from distributed import Client

    with gpu_local_cluster(1, dashboard_address=":0") as c, Client(c) as client:
        seen = client.run(
            lambda: (os.environ["CUDA_VISIBLE_DEVICES"], __import__("cupy").cuda.runtime.getDeviceCount())
        )
    # the first visible GPU, and only it
    assert list(seen.values()) == [(visible_gpus(1)[0], 1)]
