"""An error on one rank ends every rank, quickly, with a message that says where it started.

Without care, one failing rank leaves its peers waiting in the next collective until its timeout (ten minutes by
default) or forever. Two mechanisms bound that:

- **timeouts** on every group (``init_process_group(timeout=)``, ``new_group(timeout=)``): a collective that waits
  longer raises on the waiting rank;
- **fail fast**: :func:`fail_together` catches the error on the failing rank, logs it with the rank, and tears
  down the process groups this package created. With gloo the peers' sockets close and their pending collective
  raises within milliseconds ("Connection closed by peer"); they tear down in turn and raise a
  :class:`PeerFailure` that says another rank failed first. Under torchrun the failing process then exits and
  torchrun stops the others too. With NCCL a peer blocked in a kernel cannot see a closed connection; it
  ends when torchrun stops it or when NCCL's watchdog hits the timeout.

Only errors raised once the call has started communicating tear anything down (``started``): an error before the
call's first collective (a bad argument, raised alike on every rank) leaves no peer waiting, so the groups stay
and the next call works. An error on one rank alone before that point (the text encoder running out of memory)
leaves its peers in the first collective until their timeout, where they raise :class:`PeerFailure`.

What is destroyed: the groups :class:`~cogvideox.distributed.ParallelState` made (:meth:`ParallelState.owned_groups`:
its copy of the parent group, the Ulysses and the guidance groups), never the caller's group nor the default
group, so a notebook's distributed session survives. Tearing down is final for that state: a later parallel call
says so, and ``enable_parallel`` builds new groups.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator

import torch.distributed as dist

from .groups import ParallelState

logger = logging.getLogger(__name__)


class PeerFailure(RuntimeError):
    """A collective failed on this rank because another rank failed or stopped answering."""


def _is_communication_error(err: BaseException) -> bool:
    """Errors raised by a collective itself: a closed connection, a timeout, a torn-down group."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    markers = ("gloo", "Connection closed by peer", "Connection reset by peer", "Timed out", "NCCL", "ProcessGroup")
    return isinstance(err, RuntimeError) and any(marker in text for marker in markers)


def tear_down(state: ParallelState, reason: str, release: Callable[[], None] | None = None) -> None:
    """Destroy the process groups ``state`` created, so that peers waiting on them fail now, not at the timeout.
    The caller's group and the default group stay (see the module docstring).

    The groups must really go: a live Python reference keeps a gloo group's connections open, so the state
    drops its own, and ``release`` drops the others' (the transformer's hooks), before the collection.
    """
    if state.aborted is not None:
        return
    state.aborted = reason
    if release is not None:
        release()
    owned = state.owned_groups()
    state.group = state.ulysses_group = state.cfg_group = None
    for group in owned:
        try:
            dist.destroy_process_group(group)
        except (RuntimeError, ValueError) as err:  # already gone with its backend: nothing left to close
            logger.warning("rank %d: destroying a process group failed (%s)", state.rank, err)
    del owned
    gc.collect()  # closes the connections of the groups nobody refers to any more


@contextlib.contextmanager
def fail_together(
    state: ParallelState,
    release: Callable[[], None] | None = None,
    started: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Run a parallel call so that an error on any rank ends it on every rank (see the module docstring).

    ``release`` drops every other reference to the groups (see :func:`tear_down`). ``started`` says whether the
    call had begun its first collective when the error came (None: assume it had); before that, the error is
    re-raised and nothing is torn down. The rank where the error started re-raises it unchanged; a rank whose
    collective broke because of another rank raises :class:`PeerFailure` naming itself and the original message.
    """
    state.check_alive()
    rank = state.rank
    try:
        yield
    except BaseException as err:
        if started is not None and not started() and not _is_communication_error(err):
            raise  # no collective yet: no peer waits on this rank, and the groups stay usable
        if _is_communication_error(err):
            logger.error("rank %d: a collective failed (%s); tearing down the process groups", rank, err)
            tear_down(state, f"rank {rank}: {err}", release)
            raise PeerFailure(
                f"rank {rank}: a collective failed, most likely because another rank failed or hung (see the "
                f"error logged by that rank): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from err
        logger.error("rank %d failed: %s: %s; tearing down the process groups", rank, type(err).__name__, err)
        tear_down(state, f"rank {rank}: {type(err).__name__}: {err}", release)
        raise
