"""Topology detection from /sys and the per-rank core plan."""
from __future__ import annotations

from pathlib import Path

import pytest

from qlorax import hardware
from qlorax.spec import compose


def fake_sysfs(root: Path, sockets: int, cores_per_socket: int, threads_per_core: int = 2,
               flags: str = "fpu avx2 avx512f avx512_bf16 amx_bf16") -> Path:
    """A /sys + /proc tree like a Xeon's: logical CPUs numbered core-major, hyperthreads last."""
    cpu_dir = root / "sys/devices/system/cpu"
    total_cores = sockets * cores_per_socket
    n_cpus = total_cores * threads_per_core
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "online").write_text(f"0-{n_cpus - 1}\n")
    for cpu in range(n_cpus):
        core_global = cpu % total_cores
        socket, core = divmod(core_global, cores_per_socket)
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{socket}\n")
        (topo / "core_id").write_text(f"{core}\n")
    for socket in range(sockets):
        node = root / f"sys/devices/system/node/node{socket}"
        node.mkdir(parents=True)
        lo = socket * cores_per_socket
        hi = lo + cores_per_socket - 1
        (node / "cpulist").write_text(f"{lo}-{hi},{lo + total_cores}-{hi + total_cores}\n")
    (root / "proc").mkdir()
    (root / "proc/cpuinfo").write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8468\nflags\t\t: {flags}\n")
    (root / "proc/meminfo").write_text("MemTotal:       1056000000 kB\nMemAvailable:   1000000000 kB\n")
    return root


@pytest.fixture
def xeon_2s_96c(tmp_path) -> Path:
    return fake_sysfs(tmp_path / "xeon", sockets=2, cores_per_socket=48)


def test_detects_two_sockets_96_physical_cores(xeon_2s_96c):
    topo = hardware.detect(xeon_2s_96c)
    assert topo.sockets == [0, 1]
    assert topo.numa_nodes == [0, 1]
    assert len(topo.cpus) == 192
    assert len(topo.physical_cores()) == 96
    assert topo.has_avx512 and topo.has_bf16 and topo.has_amx
    assert topo.memory_available == 1000000000 * 1024
    assert "2 socket(s)" in hardware.describe(topo) and "AMX-BF16" in hardware.describe(topo)


def test_two_ranks_get_one_socket_each(xeon_2s_96c):
    topo = hardware.detect(xeon_2s_96c)
    plans = hardware.plan_ranks(topo, workers=2)
    assert [p.socket for p in plans] == [0, 1]
    assert plans[0].cpus == tuple(range(0, 48)) and plans[1].cpus == tuple(range(48, 96))
    assert all(p.threads == 48 for p in plans)
    env = plans[1].env()
    assert env["OMP_NUM_THREADS"] == "48" and "proclist=[48," in env["KMP_AFFINITY"]
    assert not set(plans[0].cpus) & set(plans[1].cpus)


def test_four_ranks_split_each_socket(xeon_2s_96c):
    plans = hardware.plan_ranks(hardware.detect(xeon_2s_96c), workers=4)
    assert [p.socket for p in plans] == [0, 0, 1, 1]
    assert [p.threads for p in plans] == [24] * 4
    assert len({c for p in plans for c in p.cpus}) == 96


def test_cores_per_worker_and_explicit_list(xeon_2s_96c):
    topo = hardware.detect(xeon_2s_96c)
    plans = hardware.plan_ranks(topo, workers=2, cores_per_worker=8)
    assert [p.threads for p in plans] == [8, 8] and [p.socket for p in plans] == [0, 1]
    plans = hardware.plan_ranks(topo, workers=2, cores=[4, 5, 6, 7])
    assert [p.cpus for p in plans] == [(4, 5), (6, 7)]


def test_odd_worker_count_splits_all_cores(xeon_2s_96c):
    plans = hardware.plan_ranks(hardware.detect(xeon_2s_96c), workers=3)
    assert [p.threads for p in plans] == [32, 32, 32]
    assert plans[1].socket is None   # spans the socket boundary


def test_plan_command_shows_per_rank_plan(xeon_2s_96c, tmp_path):
    from conftest import run_cli

    result = run_cli("plan", "parallel=ccl", "workers=2", "train.micro_batch_size=2", f"hardware.sysfs_root={xeon_2s_96c}")
    assert result.returncode == 0, result.stderr
    assert "rank 0: 48 thread(s) on CPUs 0-47 (socket 0)" in result.stdout
    assert "rank 1: 48 thread(s) on CPUs 48-95 (socket 1)" in result.stdout
    assert "torch.distributed.run" in result.stdout and "--nproc-per-node=2" in result.stdout


def test_precision_choice():
    with_bf16 = hardware.Topology(cpus=(0,), socket_of={0: 0}, core_of={0: (0, 0)}, flags=frozenset({"avx512_bf16"}))
    without = hardware.Topology(cpus=(0,), socket_of={0: 0}, core_of={0: (0, 0)}, flags=frozenset({"avx2"}))
    assert hardware.choose_precision("auto", with_bf16)[0] == "bf16"
    assert hardware.choose_precision("auto", without) == ("fp32", "CPU lacks AVX512-BF16/AMX (bf16 would be emulated and slow)")
    assert hardware.choose_precision("fp32", with_bf16)[0] == "fp32"


def test_parse_cpulist():
    assert hardware.parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]


def test_more_workers_than_cpus_is_rejected():
    import os

    from qlorax.errors import ConfigError

    n = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError) as info:
        compose(["parallel=ccl", f"workers={n + 1}", "train.micro_batch_size=1", f"train.batch_size={n + 1}"])
    assert any(p.key == "workers" and "CPUs" in p.message for p in info.value.problems)


def test_allocator_env_preloads_tcmalloc_once_and_respects_the_users_choice(tmp_path):
    libs = tmp_path / "lib"
    libs.mkdir()
    dirs = (str(tmp_path / "empty"), str(libs))
    assert hardware.allocator_env({"PATH": "/bin"}, dirs) is None                      # not installed: run as is
    (libs / "libtcmalloc_minimal.so.4").write_bytes(b"")
    env = hardware.allocator_env({"PATH": "/bin", "LD_PRELOAD": "/opt/libfoo.so"}, dirs)
    assert env["LD_PRELOAD"] == f"{libs / 'libtcmalloc_minimal.so.4'} /opt/libfoo.so" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40             # no "large alloc" lines
    assert hardware.allocator_env(env, dirs) is None                                   # the re-executed process
    assert hardware.allocator_env({"QLORAX_ALLOCATOR": "system"}, dirs) is None
    assert hardware.allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, dirs) is None   # the user's own


def test_allocator_in_use_reads_the_mapped_libraries(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert hardware.allocator_in_use(str(maps)) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert hardware.allocator_in_use(str(maps)) == "system"
    assert hardware.allocator_in_use(str(tmp_path / "missing")) == "system"


_FREED_PAGES = """
import ctypes, torch
from qlorax.engine.quant.common import return_freed_memory
lib = ctypes.CDLL(None)
def free_mib():
    value = ctypes.c_size_t()
    lib.MallocExtension_GetNumericProperty(b"tcmalloc.pageheap_free_bytes", ctypes.byref(value))
    return value.value >> 20
temporaries = [torch.ones(8 << 20) for _ in range(8)]   # 8 x 32 MiB, as a layer's dequantized weights
del temporaries
before = free_mib()
return_freed_memory()
print(before, free_mib())
"""


def test_freed_quantizing_temporaries_leave_tcmalloc_for_the_os():
    """int8 conversion frees fp32 temporaries per layer; tcmalloc kept them resident (+385 MiB on the 1.1B shape)."""
    import os
    import subprocess
    import sys

    library = hardware.find_tcmalloc()
    if library is None:
        pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    done = subprocess.run([sys.executable, "-c", _FREED_PAGES], env={**os.environ, "LD_PRELOAD": library},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = (int(v) for v in done.stdout.split())
    assert before >= 200 and after < 16
