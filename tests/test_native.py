"""Native kernels (qlorax/engine/quant/native.py): built once per machine, equal to their torch reference."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from qlorax.engine import attention, lean_native, lora_native
from qlorax.engine.quant import amx, bnb_cpu, int8, native

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in native.COMPILERS), reason="no C compiler")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """Kernels built into an empty cache; the process's own kernels come back afterwards."""
    int8._fused()   # torch.compile's kernels first: a test below takes the compiler away
    monkeypatch.setenv("QLORAX_KERNEL_CACHE", str(tmp_path / "kernels"))
    _forget_kernels()
    yield tmp_path / "kernels"
    _forget_kernels()


def _forget_kernels() -> None:
    """Every cache holding a decision made from ``native.library()``."""
    native.library.cache_clear()
    amx.library.cache_clear()
    lean_native.library.cache_clear()
    attention.library.cache_clear()
    lora_native.library.cache_clear()
    int8._fast_kernels.cache_clear()
    bnb_cpu._native_dequant.cache_clear()


@needs_compiler
@pytest.mark.parametrize("rows,cols", [(1, 64), (3, 128), (256, 192), (1100, 256), (2048, 512)])
def test_native_int4_unpack_equals_the_torch_reference(rows, cols, fresh_build):
    torch.manual_seed(rows)
    weight = torch.randn(rows, cols)
    weight[0, 5] = 40.0   # one outlier: its group's multiplier is 18, the others small
    packed, mult, _ = int8.pack_int4(weight)
    unpack = int8.kernels(True)[2]
    assert unpack is native.unpack_int4   # the native kernel, not the torch fallback
    got = unpack(packed, mult)
    assert torch.equal(got, int8.unpack_int4(packed, mult))   # row slices over threads (1100, 2048 rows) too
    assert torch.equal(unpack(packed[:1], mult[:1]), int8.unpack_int4(packed[:1], mult[:1]))   # scratch reused


@needs_compiler
def test_kernels_are_built_once_into_the_cache(fresh_build):
    assert native.library() is not None
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()   # a new process
    assert native.library() is not None
    assert list(fresh_build.iterdir()) == built and built[0].stat().st_mtime_ns == stamp   # loaded, not rebuilt


class _Impatient:
    """``subprocess`` for native.py alone, with every timeout at 1 s."""

    SubprocessError = subprocess.SubprocessError

    @staticmethod
    def run(*args, **kwargs):
        return subprocess.run(*args, **{**kwargs, "timeout": 1})


@pytest.mark.parametrize("compiler", ["none on PATH", "one that fails", "one that hangs"])
def test_without_a_working_compiler_int4_unpacks_with_torch_and_says_so(compiler, fresh_build, tmp_path,
                                                                        monkeypatch, caplog):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    system_path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    if compiler != "none on PATH":
        script = bin_dir / "g++"
        script.write_text("#!/bin/sh\necho 'fatal error: no space left' >&2\nexit 1\n" if compiler == "one that fails"
                          else f"#!/bin/sh\nexec {shutil.which('sleep', path=system_path)} 30\n")
        script.chmod(0o755)
        monkeypatch.setattr(native, "subprocess", _Impatient())   # the compiler's timeout, 1 s here
    with caplog.at_level("WARNING", logger="qlorax"):
        assert native.library() is None
    assert "native kernels unavailable" in caplog.text
    assert {"none on PATH": "install g++", "one that fails": "no space left", "one that hangs": "timed out"}[compiler] \
        in caplog.text
    monkeypatch.setenv("PATH", system_path)   # torch.compile's own kernels need the compiler back
    packed, mult, _ = int8.pack_int4(torch.randn(8, 128))
    assert torch.equal(int8.kernels(True)[2](packed, mult), int8.unpack_int4(packed, mult))


@needs_compiler
def test_a_kernel_cache_others_can_write_to_is_refused(fresh_build, caplog):
    fresh_build.mkdir(parents=True)
    fresh_build.chmod(0o777)   # anyone could drop a library here that this process would load
    with caplog.at_level("WARNING", logger="qlorax"):
        assert native.library() is None
    assert "not private to this user" in caplog.text and "QLORAX_KERNEL_CACHE" in caplog.text
    assert list(fresh_build.iterdir()) == []   # nothing built or loaded there


@needs_compiler
def test_kernels_share_torchs_openmp_runtime():
    """The kernels bind to the OpenMP runtime torch loaded (libgomp.so.1), not a second copy whose threads would
    compete with torch's (other libraries may bring privately named copies, as sentencepiece does)."""
    assert native.library() is not None
    runtimes = {line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith("/libgomp.so.1")}
    assert len(runtimes) == 1, runtimes
