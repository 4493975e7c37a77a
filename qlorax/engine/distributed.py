"""torch.distributed for data-parallel LoRA training: rank discovery, backend, pre-flight, gradients.

Ranks come from torchrun (RANK/WORLD_SIZE/LOCAL_RANK), from Kubernetes operators (the same
variables), or from Intel MPI / MPICH (PMI_RANK/PMI_SIZE) or Open MPI (OMPI_COMM_WORLD_*).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

from qlorax.errors import QloraxError

log = logging.getLogger("qlorax")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from whichever launcher started this process."""
    env = os.environ
    for rank_key, size_key, local_key in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                                          ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")):
        if rank_key in env and size_key in env:
            rank, size = int(env[rank_key]), int(env[size_key])
            return rank, size, int(env.get(local_key, rank))
    return 0, 1, 0


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, reason)."""
    import importlib.util

    has_ccl = importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None
    if requested == "gloo":
        return "gloo", "parallel.backend=gloo"
    if has_ccl:
        return "ccl", "oneccl_bindings_for_pytorch is installed"
    if requested == "ccl":
        raise QloraxError("parallel.backend=ccl but oneccl_bindings_for_pytorch is not importable in this "
                          "environment: install Intel's oneCCL bindings matching your torch, or use parallel.backend=gloo")
    return "gloo", "oneccl_bindings_for_pytorch is not installed (pip install oneccl_bind_pt for oneCCL)"


def init(requested_backend: str, preflight_timeout_s: float, collective_timeout_s: float = 1800.0) -> World:
    """Join the process group (if there is more than one rank) and prove it works.

    Rendezvous and the pre-flight all-reduce must finish within ``preflight_timeout_s``, so a
    missing rank or a blocked port fails in seconds; later collectives get ``collective_timeout_s``.
    """
    rank, size, local_rank = env_world()
    if size == 1:
        return World()
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend, reason = choose_backend(requested_backend)
    if backend == "ccl":
        import oneccl_bindings_for_pytorch  # noqa: F401  (registers the backend)
    timeout = datetime.timedelta(seconds=preflight_timeout_s)
    try:
        # torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT; otherwise rank 0 does.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                              is_master=rank == 0 and not agent_store, timeout=timeout,
                              wait_for_workers=not agent_store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
        probe = torch.ones(1)
        work = dist.all_reduce(probe, async_op=True)
        if not work.wait(timeout=timeout) or int(probe.item()) != size:
            raise RuntimeError(f"all-reduce returned {probe.item()} instead of {size}")
    except Exception as exc:
        raise QloraxError(f"rank {rank}: pre-flight all-reduce over {backend} failed within {preflight_timeout_s:.0f}s "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); check that every rank "
                          f"reaches MASTER_ADDR={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} and that "
                          "the port is free") from None
    if rank == 0:
        log.info("distributed: %d ranks over %s (%s); pre-flight all-reduce ok", size, backend, reason)
    # After the pre-flight the collective timeout can be generous: a step may take minutes.
    return World(rank=rank, size=size, local_rank=local_rank, backend=backend)


# How gloo and oneCCL report that the other end of a collective went away (it died, or was killed).
_PEER_LOST_TEXT = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
                   "Socket closed", "ECONNRESET", "EPIPE")


def is_peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank disappeared (not this rank's own fault)."""
    return isinstance(exc, (RuntimeError, ConnectionError, OSError)) and any(t in str(exc) for t in _PEER_LOST_TEXT)


def sum_gradients(params, world: World) -> None:
    """All-reduce (sum) the LoRA gradients as one flat buffer.

    Each rank's loss is already divided by the token count of the whole global batch, so
    the sum over ranks is exactly the single-process gradient.
    """
    if not world.distributed:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def max_divergence(params, world: World) -> float:
    """Largest difference between any rank's parameters and rank 0's (0.0 means identical)."""
    if not world.distributed:
        return 0.0
    import torch
    import torch.distributed as dist

    mine = torch.cat([p.detach().reshape(-1).float() for p in params])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    diff = (mine - reference).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            # Every rank tears gloo down together: a rank that destroyed its group while rank 0 was still writing
            # the summary died at exit now and then ("terminate called without an active exception", SIGABRT).
            dist.barrier()
            dist.destroy_process_group()
