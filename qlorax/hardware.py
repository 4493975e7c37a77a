"""What the machine is (sockets, NUMA nodes, physical cores, ISA, memory) and how ranks share it.

Read from ``/sys`` and ``/proc`` under a configurable root, so a fixture directory can stand
in for a 2-socket, 96-core Xeon in tests (``hardware.sysfs_root``). Nothing here imports torch.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Topology:
    cpus: tuple[int, ...]                        # usable logical CPU ids
    socket_of: dict[int, int]                    # cpu -> physical package
    core_of: dict[int, tuple[int, int]]          # cpu -> (socket, core id): hyperthreads share it
    numa_of: dict[int, int] = field(default_factory=dict)
    model_name: str = "unknown CPU"
    flags: frozenset[str] = frozenset()
    memory_total: int = 0                        # bytes
    memory_available: int = 0                    # bytes (cgroup limit applied)

    @property
    def sockets(self) -> list[int]:
        return sorted(set(self.socket_of[c] for c in self.cpus))

    @property
    def numa_nodes(self) -> list[int]:
        return sorted(set(self.numa_of.values())) or [0]

    def physical_cores(self, socket: int | None = None) -> list[int]:
        """One logical CPU per physical core (the first sibling), optionally on one socket."""
        seen, out = set(), []
        for cpu in self.cpus:
            core = self.core_of[cpu]
            if core in seen or (socket is not None and core[0] != socket):
                continue
            seen.add(core)
            out.append(cpu)
        return out

    @property
    def has_avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def has_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]"""
    out: list[int] = []
    for part in filter(None, text.replace(" ", "").split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def detect(root: str | Path = "/") -> Topology:
    """Read the topology under ``root`` (``/`` for this machine)."""
    root = Path(root)
    cpu_dir = root / "sys/devices/system/cpu"
    online = parse_cpulist(_read(cpu_dir / "online")) or sorted(
        int(p.name[3:]) for p in cpu_dir.glob("cpu[0-9]*")) or list(range(os.cpu_count() or 1))
    if str(root) == "/" and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)   # respect taskset / cgroup cpusets
        online = [c for c in online if c in allowed] or sorted(allowed)
    socket_of, core_of = {}, {}
    for cpu in online:
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        sock = int(_read(topo / "physical_package_id", "0") or 0)
        core = int(_read(topo / "core_id", str(cpu)) or cpu)
        socket_of[cpu], core_of[cpu] = sock, (sock, core)
    numa_of = {}
    for node in sorted((root / "sys/devices/system/node").glob("node[0-9]*")):
        for cpu in parse_cpulist(_read(node / "cpulist")):
            numa_of[cpu] = int(node.name[4:])
    cpuinfo = _read(root / "proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    total, available = _memory(root)
    return Topology(cpus=tuple(online), socket_of=socket_of, core_of=core_of, numa_of=numa_of,
                    model_name=model.group(1).strip() if model else "unknown CPU",
                    flags=frozenset(flags.group(1).split()) if flags else frozenset(),
                    memory_total=total, memory_available=available)


def _memory(root: Path) -> tuple[int, int]:
    info = {}
    for line in _read(root / "proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            info[key] = int(parts[0]) * 1024
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", total)
    limit = _read(root / "sys/fs/cgroup/memory.max")
    if limit.isdigit():
        usage = _read(root / "sys/fs/cgroup/memory.current")
        cg_free = int(limit) - (int(usage) if usage.isdigit() else 0)
        available = min(available, cg_free) if available else cg_free
        total = min(total, int(limit)) if total else int(limit)
    return total, available


@dataclass(frozen=True)
class RankPlan:
    rank: int
    cpus: tuple[int, ...]
    socket: int | None

    @property
    def threads(self) -> int:
        return len(self.cpus)

    def env(self) -> dict[str, str]:
        """Thread-count and affinity variables for GNU (GOMP) and Intel (KMP) OpenMP runtimes."""
        cpus = ",".join(map(str, self.cpus))
        return {
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "OMP_PROC_BIND": "close",
            "OMP_PLACES": ",".join("{%d}" % c for c in self.cpus),
            "KMP_AFFINITY": f"granularity=fine,explicit,proclist=[{cpus}]",
            "KMP_BLOCKTIME": "1",
        }


def plan_ranks(topo: Topology, workers: int, cores_per_worker: int | None = None,
               cores: list[int] | tuple[int, ...] | None = None) -> list[RankPlan]:
    """Give each rank a disjoint set of physical cores.

    Default: when the workers divide evenly over the sockets, each rank gets a slice of one
    socket (one rank per socket on a 2-socket box with workers=2); otherwise the physical
    cores are split evenly in order. ``cores_per_worker`` caps each slice; ``cores`` is an
    explicit list of CPU ids split between the ranks.
    """
    if cores:
        pool = [list(cores)]
    else:
        sockets = topo.sockets
        if workers % len(sockets) == 0:
            pool = [topo.physical_cores(s) for s in sockets]
        else:
            pool = [topo.physical_cores()]
    per_pool = workers // len(pool)
    plans: list[RankPlan] = []
    for index, group in enumerate(pool):
        share = max(1, len(group) // per_pool)
        if cores_per_worker:
            share = min(share, cores_per_worker) if len(group) >= per_pool else share
        for k in range(per_pool):
            chunk = group[k * share:(k + 1) * share] or group[k % len(group):k % len(group) + 1]
            sockets_used = {topo.socket_of.get(c) for c in chunk}
            socket = sockets_used.pop() if len(sockets_used) == 1 else None
            plans.append(RankPlan(rank=len(plans), cpus=tuple(chunk), socket=socket))
    return plans


def describe(topo: Topology) -> str:
    """One-paragraph hardware report."""
    isa = [name for name, ok in (("AVX-512", topo.has_avx512), ("AVX512-BF16", "avx512_bf16" in topo.flags),
                                 ("AMX-BF16", topo.has_amx)) if ok]
    gib = 1024 ** 3
    return (f"{topo.model_name}: {len(topo.sockets)} socket(s), {len(topo.numa_nodes)} NUMA node(s), "
            f"{len(topo.physical_cores())} physical cores ({len(topo.cpus)} logical usable), "
            f"ISA: {', '.join(isa) or 'no AVX-512'}, memory {topo.memory_available / gib:.1f} of "
            f"{topo.memory_total / gib:.1f} GiB available")


# oneDNN keeps a compiled kernel (and its scratch memory) per input shape it has seen. Variable-
# length batches create a new shape nearly every step, so with the defaults (1024 entries) RSS
# grows for the whole run (stories260K: 800 -> 1,650 MiB over 200 steps); 64 keeps it flat at the
# same speed. Applied with setdefault before torch loads, so a user's own setting wins.
KERNEL_CACHE_ENV = {"DNNL_PRIMITIVE_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
                    "LRU_CACHE_CAPACITY": "64"}


def apply_runtime_defaults() -> None:
    """Set qlorax's CPU runtime defaults in this process's environment (before torch is imported)."""
    for key, value in KERNEL_CACHE_ENV.items():
        os.environ.setdefault(key, value)


# ---------------------------------------------------------------- memory allocator
# glibc's malloc serves every tensor below its mmap threshold (which it raises to 32 MiB as big blocks are freed)
# from its heap, and training's activations, freed and reallocated each step in shifting sizes, fragment it: on
# the TinyLlama-1.1B shape at batch 1 the process peaked at 2.0-3.0 GiB from run to run with int4 storage, where
# tcmalloc holds 1.6 GiB, and steps ran 0-10% faster (README, "Memory and speed"). Lowering glibc's threshold instead returns
# the memory but page-faults every activation in again: 1.7 GiB at 1 MiB, with steps ~50% slower.
# tcmalloc must be loaded before anything else (LD_PRELOAD), so the CLI re-executes itself once with it;
# ranks, pods and subprocesses inherit the variable. QLORAX_ALLOCATOR=system keeps glibc; a user's own
# LD_PRELOAD of an allocator wins.
TCMALLOC_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib", "/lib/x86_64-linux-gnu")
ALLOCATOR_ENV = "QLORAX_ALLOCATOR"
_REEXEC_MARK = "QLORAX_ALLOCATOR_LOADED"


def find_tcmalloc(dirs: tuple[str, ...] = _LIBRARY_DIRS) -> str | None:
    """Path of tcmalloc's shared library (Debian/Ubuntu: libtcmalloc-minimal4; RHEL: gperftools-libs), or None."""
    for directory in dirs:
        for name in TCMALLOC_LIBRARIES:
            path = Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def allocator_env(environ: dict[str, str], dirs: tuple[str, ...] = _LIBRARY_DIRS) -> dict[str, str] | None:
    """The environment to re-execute this process in so that tcmalloc serves its memory; None to run as is."""
    choice = environ.get(ALLOCATOR_ENV, "auto")
    preload = environ.get("LD_PRELOAD", "")
    if choice == "system" or environ.get(_REEXEC_MARK) or "malloc" in preload:
        return None
    library = find_tcmalloc(dirs)
    if library is None:
        return None
    return {**environ, "LD_PRELOAD": f"{library} {preload}".strip(), _REEXEC_MARK: "1",
            # gperftools reports each allocation over 1 GiB on stderr (a 7B model's embedding is one)
            "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))}


def reexec_with_allocator(module: str) -> None:
    """Replace this process with ``python -m module <same arguments>`` under tcmalloc, where ``allocator_env`` says to.

    Called first thing by the CLI and by a worker started on its own; returns only when nothing is to change.
    """
    import sys

    env = allocator_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def allocator_in_use(maps: str = "/proc/self/maps") -> str:
    """Which malloc serves this process: tcmalloc, jemalloc or system (glibc), read from its mapped libraries."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in text:
            return name
    return "system"


def allocator_advice() -> str:
    """What to install for tcmalloc when it is missing (shown in the run log)."""
    return ("tcmalloc not found: install libtcmalloc-minimal4 (Debian/Ubuntu) or gperftools-libs (RHEL) for "
            "lower and steadier peak memory")


def choose_precision(requested: str, topo: Topology) -> tuple[str, str]:
    """(dtype, reason): bf16 when asked or when the CPU computes bf16 natively, else fp32."""
    if requested == "bf16":
        return "bf16", "train.precision=bf16"
    if requested == "fp32":
        return "fp32", "train.precision=fp32"
    if topo.has_bf16:
        return "bf16", "CPU has " + ("AMX-BF16" if topo.has_amx else "AVX512-BF16")
    return "fp32", "CPU lacks AVX512-BF16/AMX (bf16 would be emulated and slow)"
