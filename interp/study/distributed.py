"""Scale-out of a study over the processes of one host, as ``torchrun`` launches them.

``torchrun --standalone --nproc_per_node N -m interp.cli run ...`` starts N copies of the study;
each learns its place from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``: the ``env://`` method).
Without those variables (a plain ``interp run``) :func:`init_world` returns the one-process
:class:`World`, whose collectives are no-ops, so the one-process path does no extra work.

Only coordination crosses processes: barriers and small Python objects (lists of names). The
results themselves pass through the run directory — each rank writes the unit caches of its own
shard (one file per expert, variant...), and rank 0 assembles the tables from them exactly as a
one-process run does. So the process group is always ``gloo`` (CPU sockets), also when the study
runs on GPUs: there is no tensor to reduce, a barrier does not occupy a GPU stream while rank 0
works alone (figures, report), and the CPU test in CI exercises the very backend a GPU host
uses. Each rank computes on its own device: ``cuda:LOCAL_RANK`` when the study's device is a GPU.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from interp.errors import StudyError

# A rank that finished its shard waits at a barrier for the slowest one (an expert trained for an
# hour, a figures step on rank 0): the default 30-minute gloo timeout would abort a healthy run.
# A rank that crashes is not waited for: torchrun ends the whole group when one process fails.
DEFAULT_TIMEOUT_S = 7 * 24 * 3600
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one study run.

    Attributes:
        rank: 0 … ``size - 1``; rank 0 writes every table, marker and ``run.json``.
        size: number of processes (1: a plain one-process run; every collective is a no-op).
        local_rank: index on this host (picks the GPU: ``cuda:local_rank``).
        local_size: processes on this host (CPU threads are shared among them).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    _claims: list = field(default_factory=list, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, configured: str) -> str:
        """The torch device this rank computes on for the study's configured device: unchanged in
        a one-process run or on the CPU; ``cuda:LOCAL_RANK`` for ``cuda`` or ``cuda:N`` when
        several processes share the host (one GPU each: ``CUDA_VISIBLE_DEVICES`` selects them),
        or ``cuda:(LOCAL_RANK mod n_gpus)`` with ``INTERP_SHARE_GPUS=1`` (:func:`gpu_index`)."""
        if self.size == 1 or not configured.startswith("cuda"):
            return configured
        return f"cuda:{gpu_index(self.local_rank)}"

    def shard(self, items: Sequence[Any], cost: Callable[[Any], float] | None = None) -> list[Any]:
        """This rank's items of ``items``, in their given order (which every rank derives from
        the same config). Without ``cost``: round robin, item ``i`` to rank ``i mod size``. With
        ``cost`` (relative work of an item): :func:`assign`, longest items first, each to the
        least-loaded rank. Either way a pure function of the list, never of timing or rank.

        Raises:
            StudyError: the ranks were given different lists (a unit would be lost or doubled).
        """
        items = list(items)
        if self.size == 1:
            return items
        costs = [float(cost(x)) for x in items] if cost is not None else None
        digest = hashlib.sha256(json.dumps([[str(x) for x in items], costs]).encode()).hexdigest()
        if len(set(self.gather(digest))) != 1:
            raise StudyError("the ranks of a distributed run disagree on the list of work units to share; "
                             "they must run the same config and code")
        owners = assign(costs, self.size) if costs is not None else [i % self.size for i in range(len(items))]
        return [x for x, r in zip(items, owners) if r == self.rank]

    def claim(self, items: Sequence[Any], cost: Callable[[Any], float], scratch: str | os.PathLike) -> Iterator[Any]:
        """The items this rank computes, handed out as the ranks get free: a work queue, for
        units whose cost is only known once they run (an expert under the accuracy floor trains
        twice). Items go out by decreasing ``cost`` (ties: list order); a rank asking for its
        next item claims the first unclaimed one by creating its claim file with ``O_EXCL`` in
        a directory of ``scratch`` that is new for this call (rank 0 names it), so each item goes to exactly
        one rank. Which rank takes an item depends on timing; nothing a unit computes may
        depend on the rank (seeds come from the config and the unit's name). One process: every
        item, in cost order. Call :meth:`barrier` after the loop; rank 0 removes the claims there
        (:meth:`release_claims`).

        Raises:
            StudyError: the ranks were given different lists.
        """
        items = list(items)
        order = sorted(range(len(items)), key=lambda i: (-float(cost(items[i])), i))
        if self.size == 1:
            yield from (items[i] for i in order)
            return
        digest = hashlib.sha256(json.dumps([str(items[i]) for i in order]).encode()).hexdigest()
        if len(set(self.gather(digest))) != 1:
            raise StudyError("the ranks of a distributed run disagree on the list of work units to share; "
                             "they must run the same config and code")
        import uuid

        where = Path(scratch) / self.broadcast(uuid.uuid4().hex if self.is_main else None)
        where.mkdir(parents=True, exist_ok=True)
        self._claims.append(where)
        for k, i in enumerate(order):
            try:
                fd = os.open(where / str(k), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue  # another rank took it
            os.write(fd, str(self.rank).encode())
            os.close(fd)
            yield items[i]

    def release_claims(self) -> None:
        """Rank 0 removes the claim directories of :meth:`claim` (after a barrier: every rank is past them)."""
        import shutil

        for where in self._claims:
            if self.is_main:
                shutil.rmtree(where, ignore_errors=True)
        self._claims.clear()

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op in a one-process run)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank (picklable objects)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (so every rank takes the same decision)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def assign(costs: Sequence[float], size: int) -> list[int]:
    """The rank of each item: longest-processing-time greedy (Graham 1969) — items by decreasing
    cost (ties: list order), each to the rank with the least cost so far (ties: lowest rank).
    Deterministic; the slowest rank's load is at most 4/3 of the best possible split's.

    Raises:
        StudyError: ``size < 1`` or a negative or non-finite cost.
    """
    if size < 1:
        raise StudyError(f"assign: size must be >= 1, got {size}")
    bad = [c for c in costs if not (0 <= c < float("inf"))]
    if bad:
        raise StudyError(f"assign: costs must be finite and >= 0, got {bad[0]!r}")
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise StudyError(f"distributed run: ${name} is not set (launch with torchrun, which sets "
                             f"{', '.join(ENV_VARS)})")
        return default
    try:
        return int(raw)
    except ValueError:
        raise StudyError(f"distributed run: ${name} must be an integer, got {raw!r}") from None


SHARE_GPUS_ENV = "INTERP_SHARE_GPUS"


def gpu_index(local_rank: int, n_gpus: int | None = None) -> int:
    """The GPU of local rank ``local_rank``: itself, or with ``$INTERP_SHARE_GPUS=1`` (several
    processes per GPU) ``local_rank mod n_gpus`` (``n_gpus``: the visible GPUs by default; none
    visible: ``local_rank``, refused later by the device check). Sharing one GPU among processes
    overlaps the host-side work of each (Python, kernel launches) with the others' kernels: a
    study whose steps are launch-bound (expert training at batch 16) keeps the GPU busier."""
    import torch

    n = torch.cuda.device_count() if n_gpus is None else int(n_gpus)
    if os.environ.get(SHARE_GPUS_ENV, "") == "1" and n >= 1:
        return local_rank % n
    return local_rank


def init_world(configured_device: str = "cpu") -> World:
    """This process's :class:`World`, joining the torchrun process group if there is one.

    ``WORLD_SIZE`` unset or 1 → the one-process world (nothing initialised). Otherwise the
    ``gloo`` process group is initialised over ``env://`` (once per process; it is destroyed at
    exit) with a week-long timeout (:data:`DEFAULT_TIMEOUT_S`, or ``$INTERP_DIST_TIMEOUT_S``),
    and on a GPU study this rank's GPU ``cuda:LOCAL_RANK`` becomes the current device.

    Raises:
        StudyError: a torchrun variable missing or not an integer; HardwareError: a GPU study
        with fewer visible GPUs than processes on the host (unless ``$INTERP_SHARE_GPUS=1``).
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    world = World(rank=rank, size=size, local_rank=local_rank, local_size=_env_int("LOCAL_WORLD_SIZE", size))
    import torch
    import torch.distributed as dist

    if configured_device.startswith("cuda"):
        from interp.devices import HardwareError

        n, idx = torch.cuda.device_count(), gpu_index(local_rank)
        if idx >= n:
            raise HardwareError(f"distributed run: local rank {local_rank} needs GPU {idx}, but "
                                f"{n} GPU(s) are visible; use --nproc_per_node {n} or fewer, or "
                                f"{SHARE_GPUS_ENV}=1 to share them")
        torch.cuda.set_device(idx)
    if not dist.is_initialized():  # first call in this process (a run over seeds makes several)
        watch_parent()
        timeout = _env_int("INTERP_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout))
        atexit.register(_destroy)
    if (dist.get_rank(), dist.get_world_size()) != (rank, size):
        raise StudyError(f"distributed run: the process group is rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}, the environment says {rank} of {size}")
    return world


#: ``--procs auto`` on a CPU starts one process per free core, up to this many
AUTO_CPU_PROCS = 4


def resolve_procs(value: int, device: str) -> int:
    """Processes for ``interp run --procs``: ``value`` if positive, else (``0``: auto) one per
    free core on a CPU, at most :data:`AUTO_CPU_PROCS` (each process holds its own models, and
    a step has 5-12 units to share), each then running one torch thread; one per visible GPU
    on CUDA. On 2 cores two 1-thread processes beat one 2-thread process (README "Processors,
    precision and threads").

    Raises:
        StudyError: a negative count, or more processes than the CPU's cores / the GPUs.
    """
    from interp.hardware import free_cores

    if value < 0:
        raise StudyError(f"--procs must be a positive integer, or 0 or 'auto' for automatic, got {value}")
    on_gpu = device.startswith("cuda")
    if on_gpu:
        import torch

        limit, what = torch.cuda.device_count(), "GPUs"
    else:
        limit = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        what = "CPU cores"
    if value == 0:
        return max(1, limit if on_gpu else min(free_cores(), AUTO_CPU_PROCS))
    if value > max(1, limit):
        raise StudyError(f"--procs {value}: this machine has {limit} {what}; more processes than that "
                         "only wait on each other")
    return value


def launch_command(procs: int, cli_args: Sequence[str]) -> list[str]:
    """The command that runs ``interp <cli_args>`` as ``procs`` torchrun processes on this host
    (``python -m torch.distributed.run --standalone``), with this interpreter."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            "-m", "interp.cli", *cli_args]


def watch_parent(interval_s: float = 1.0) -> None:
    """End this process (SIGTERM to itself) once its parent is gone. torchrun starts each rank in a
    session of its own, so a rank outlives a torchrun killed with SIGKILL (or a kill of the
    launcher's process group) and would go on writing the run directory while the user believes
    the run stopped. A daemon thread polls ``os.getppid()``: a ``prctl(PR_SET_PDEATHSIG)`` would
    fire when the spawning *thread* ends, which torchrun does not promise to keep alive."""
    import os
    import signal
    import threading
    import time

    parent = os.getppid()

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="interp-watch-parent", daemon=True).start()


def terminate_with_parent() -> None:
    """``preexec_fn`` for a child started by the main thread of a launcher: the child gets SIGTERM
    when the launcher dies, even by SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
