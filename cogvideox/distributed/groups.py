"""Which rank does what: the parallel layout and the process groups built from it.

A run on ``N = U x C`` processes splits the work two ways:

- **Ulysses sequence parallel** (degree ``U``): the ``U`` ranks of a Ulysses group share one forward pass, each
  holding ``1/U`` of the video tokens (see :mod:`cogvideox.distributed.ulysses`);
- **guidance parallel** (degree ``C`` in {1, 2}): with classifier-free guidance on, the unconditional branch runs
  on one half of the world and the conditional branch on the other (see :mod:`cogvideox.distributed.guidance`).

Ranks are laid out ``rank = c * U + u`` (``c`` the guidance branch, ``u`` the position in the Ulysses group), so a
Ulysses group is ``U`` consecutive ranks: with one process per GPU and ``U`` dividing the GPUs of a node, the
all-to-all traffic, by far the largest, stays inside a node (NVLink), and only the once-per-step guidance exchange
crosses nodes.

Nothing here runs at import. Every object holds its process groups; nothing is read from a global except
``torch.distributed``'s own default group when no parent group is given.

Which groups are whose: the caller owns the parent group (the one passed to :class:`ParallelState`, or the default
group) and never loses it. :class:`ParallelState` creates its own groups with ``new_group``: a copy of the parent
(for the broadcasts and gathers that span every rank), the Ulysses groups and the guidance groups. Only those are
destroyed when a call fails (:mod:`cogvideox.distributed.failure`), so a failure ends this package's parallel runs
but leaves the caller's distributed session, and any group of its own, working.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
GUIDANCE_DEGREES = (1, 2)  # two branches (unconditional, conditional): nothing more to split


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How to split one generation over ``ulysses_degree x cfg_degree`` processes.

    Args:
        ulysses_degree: ranks sharing each transformer forward pass (sequence parallel, any positive integer: the
            video tokens and, when needed, the attention heads are padded to a multiple of it).
        cfg_degree: 2 runs the unconditional and conditional guidance branches on different ranks; 1 batches them.
    """

    ulysses_degree: int = 1
    cfg_degree: int = 1

    def __post_init__(self) -> None:
        u, c = self.ulysses_degree, self.cfg_degree
        if isinstance(u, bool) or not isinstance(u, int) or u < 1:
            raise ValueError(f"ulysses_degree={u!r}: must be a positive integer (1 turns sequence parallel off)")
        if isinstance(c, bool) or c not in GUIDANCE_DEGREES:
            raise ValueError(
                f"cfg_degree={c!r}: must be 1 (both guidance branches on each rank) or 2 (one branch per half of "
                "the world); guidance has only two branches to split"
            )

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.cfg_degree

    def check_world_size(self, world_size: int) -> None:
        """Raise unless this layout uses exactly ``world_size`` processes."""
        if world_size != self.world_size:
            hints = []
            if world_size % 2 == 0:
                hints.append(f"ulysses_degree={world_size // 2}, cfg_degree=2")
            hints.append(f"ulysses_degree={world_size}, cfg_degree=1")
            raise ValueError(
                f"ulysses_degree={self.ulysses_degree} x cfg_degree={self.cfg_degree} = {self.world_size} "
                f"processes, but the process group has {world_size}: the product must equal the number of "
                f"processes (e.g. {' or '.join(hints)}; on the command line --ulysses-degree and --cfg-parallel)"
            )


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of rank ``group_rank`` of ``group`` (None: the default group, whose ranks are global).
    Collectives name their source or destination by global rank, whatever group they run on."""
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a small control tensor (a seed, a flag, a frame count) must live for a collective on ``group``.

    NCCL moves CUDA tensors only, and uses the process's current CUDA device (``init_from_env`` sets it to
    ``cuda:LOCAL_RANK``); every other backend (gloo, MPI, a mixed ``cpu:gloo,cuda:nccl`` group) takes CPU tensors.
    The rule does not follow any model's device: under CPU offload a component sits in host memory between its
    uses, while the group still needs its own device.
    """
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ParallelState:
    """The process groups of one :class:`ParallelConfig`, built from a parent group (default: the whole world).

    Attributes:
        config: the layout.
        parent: the caller's group (``None`` = torch.distributed's default group); never destroyed here.
        group: this package's copy of ``parent`` (same ranks, with ``timeout``): the broadcasts, the decode's gathers
            and the other whole-world collectives run on it, so that a failure can tear it down alone.
        rank, world_size: this process's rank in the parent group, and its size.
        ulysses_group, ulysses_rank: the ``U`` ranks sharing a forward pass, and this rank's place among them.
        cfg_group, cfg_rank: the ranks holding the same tokens in the other guidance branch; ``cfg_rank`` is the
            branch this rank computes (0 unconditional, 1 conditional).

    All ranks of the parent group must build it together, with the same config (``new_group`` is collective).
    :meth:`owned_groups` lists the groups it created, the only ones a failure destroys.
    """

    def __init__(
        self,
        config: ParallelConfig,
        group: dist.ProcessGroup | None = None,
        *,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: launch with torchrun and call "
                "cogvideox.distributed.init_from_env() (or torch.distributed.init_process_group) before "
                "enabling parallel inference"
            )
        self.config = config
        self.parent = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        config.check_world_size(self.world_size)
        self.timeout = timeout
        self.aborted: str | None = None  # why the groups were torn down, once they were
        u_deg, c_deg = config.ulysses_degree, config.cfg_degree
        self.cfg_rank, self.ulysses_rank = divmod(self.rank, u_deg)
        global_ranks = [global_rank(group, r) for r in range(self.world_size)]
        # new_group is collective over the parent group: every rank creates every group, in the same order. Under
        # a sub-group parent the ranks outside it do not take part, so the groups are made with local
        # synchronisation (named after their ranks, not after a world-wide counter that those ranks would not
        # advance: two halves of a world running side by side would otherwise create groups of the same name).
        local = {"use_local_synchronization": group is not None and self.world_size != dist.get_world_size()}
        self.group: dist.ProcessGroup | None = dist.new_group(global_ranks, timeout=timeout, **local)
        self.ulysses_group = self.cfg_group = None
        if u_deg > 1:
            for c in range(c_deg):
                ranks = [global_ranks[c * u_deg + u] for u in range(u_deg)]
                made = dist.new_group(ranks, timeout=timeout, **local)
                if c == self.cfg_rank:
                    self.ulysses_group = made
        if c_deg > 1:
            for u in range(u_deg):
                ranks = [global_ranks[c * u_deg + u] for c in range(c_deg)]
                made = dist.new_group(ranks, timeout=timeout, **local)
                if u == self.ulysses_rank:
                    self.cfg_group = made
        logger.info(
            "rank %d of %d: Ulysses rank %d of %d, guidance branch %d of %d",
            self.rank, self.world_size, self.ulysses_rank, u_deg, self.cfg_rank, c_deg,
        )  # fmt: skip

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and shows progress (rank 0 of the parent group)."""
        return self.rank == 0

    def main_global_rank(self) -> int:
        """The global rank of the parent group's rank 0 (collectives name their source by global rank)."""
        return global_rank(self.parent, 0)

    def owned_groups(self) -> list[dist.ProcessGroup]:
        """The live groups this state created (its copy of the parent, this rank's Ulysses and guidance groups);
        never the caller's group or the default group."""
        return [g for g in (self.group, self.ulysses_group, self.cfg_group) if g is not None]

    def check_alive(self) -> None:
        if self.aborted is not None:
            raise RuntimeError(
                f"the parallel process groups were torn down after a failure ({self.aborted}); call "
                "pipe.enable_parallel(...) again on every rank to build new ones (torch.distributed itself, and the "
                "group you passed, are still there)"
            )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ParallelState(rank={self.rank}/{self.world_size}, ulysses={self.ulysses_rank}/{c.ulysses_degree}, "
            f"cfg={self.cfg_rank}/{c.cfg_degree})"
        )


def init_from_env(
    timeout: datetime.timedelta = DEFAULT_TIMEOUT, backend: str | None = None
) -> tuple[torch.device, int, int]:
    """Initialize torch.distributed from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and return ``(device, rank, world_size)``.

    The backend is NCCL when CUDA is available, else gloo. On CUDA the process's current device becomes
    ``cuda:LOCAL_RANK`` (NCCL uses the current device), and that device is returned; on the CPU, ``cpu``.
    ``timeout`` bounds every collective: a rank that waits longer for its peers raises instead of hanging.
    Already initialized: returns the current setting and changes nothing.
    """
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"{', '.join(missing)} not set: start the processes with torchrun (e.g. torchrun --nproc-per-node 2 "
            "-m cogvideox generate ...), which sets them, or set them yourself"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=timeout)
    return device, dist.get_rank(), dist.get_world_size()
