"""Where a run keeps its state, and checkpoints that a kill can never corrupt.

Layout of a run directory (``--run-dir``)::

    <run_dir>/<fingerprint>/checkpoints/step00000040.ckpt   # resumable state of the (chopped) run
    <run_dir>/<fingerprint>/phases/000/step00000500.ckpt    # a phase's own (the warm start; gradual chopping)
    <run_dir>/<fingerprint>/phase-logs/000/version_N/metrics.csv
    <run_dir>/<fingerprint>/logs/version_N/metrics.csv       # one CSV log per invocation
    <run_dir>/<fingerprint>/snapshots/step_XXXXXX/           # intermediate HF exports
    <run_dir>/<fingerprint>/snapshot-timing/step_XXXXXX.json # their wall times (for the run's metrics)

Everything a run writes sits under its fingerprint (configuration, initial weights, data, code), so a
checkpoint is only ever resumed by the run that wrote it, and nothing of another configuration is deleted:
it simply stays in its own directory. A checkpoint is written under a hidden ``.partial`` name by every rank
(``trainer.save_checkpoint`` is a collective for sharded checkpoints), and global rank 0 renames it into
place once every rank has finished: a directory rename is atomic, so the newest ``step*.ckpt`` is always
complete. Only then is the previous one removed.

One view of the file system: on a cluster the ranks of other nodes may see a rename or a new file late (NFS
attribute and negative-lookup caches), so every decision that depends on what is on disk (a checkpoint
exists, the newest complete one, the phase to resume) is made by global rank 0 and broadcast
(:func:`rank0_decides`); no rank decides from its own view.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback

CKPT_GLOB = "step*.ckpt"


def global_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not distributed)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


T = TypeVar("T")
_DECISIONS = {"group": None, "made": False}


def init_process_group(accelerator: str) -> None:
    """Start the default process group of a launched run (torchrun or a SLURM job) before its first decision,
    the way Lightning would (same environment, backend, device and timeout: Lightning then finds it started and
    uses it), so that rank 0's decisions can be broadcast before the first Trainer exists. No-op in one process."""
    import torch
    import torch.distributed as dist
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    from lightning.fabric.utilities.distributed import _init_dist_connection

    from layerchop.launch import under_slurm

    if not dist.is_available() or dist.is_initialized():
        return
    if under_slurm():
        env = SLURMEnvironment(auto_requeue=False)
    elif TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
    else:
        return
    if env.world_size() <= 1:
        return
    kwargs = {"timeout": default_pg_timeout}  # Lightning's (30 min; NCCL's own default is 10)
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank())
        torch.cuda.set_device(device)
        backend, kwargs["device_id"] = "nccl", device
    else:
        backend = "gloo"
    _init_dist_connection(env, backend, **kwargs)


def rank0_decides(decide: Callable[[], T]) -> T:
    """``decide()`` run on global rank 0 alone; every rank returns its answer (a collective when distributed:
    call it on every rank at the same point). An exception raised there is raised on every rank (a
    ``ValueError`` / ``FileNotFoundError`` as such, anything else as a ``RuntimeError`` naming it). The answer goes over a gloo group (NCCL needs no part in it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    if not _DECISIONS["made"]:  # the first call, on every rank at once
        _DECISIONS["group"] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        _DECISIONS["made"] = True
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # every rank raises it: none is left waiting in the broadcast
            box[0] = (type(e).__name__, str(e))
    dist.broadcast_object_list(box, src=0, group=_DECISIONS["group"])
    kind, value = box[0]
    if kind == "ok":
        return value
    raise {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(kind, RuntimeError)(
        value if kind in ("FileNotFoundError", "ValueError") else f"global rank 0: {kind}: {value}")


def _step(path: Path) -> int:
    return int(path.name[len("step"):-len(".ckpt")])


def newest_complete(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint of the highest step in ``ckpt_dir`` (partial ones are hidden and never match).

    Only state inside the run directory is resumed implicitly: a ``step*.ckpt`` that is a link resolving
    outside ``ckpt_dir`` is refused with a ``ValueError`` (a checkpoint from elsewhere must be named with
    ``--resume PATH``)."""
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob(CKPT_GLOB) if p.name[4:-5].isdigit()]
    if not found:
        return None
    newest = max(found, key=_step)
    inside = ckpt_dir.resolve()
    if not newest.resolve().is_relative_to(inside):
        raise ValueError(f"{newest}: links outside the run directory (to {newest.resolve()}); a checkpoint from "
                         "elsewhere is resumed only when named with --resume PATH")
    return newest


class RunLayout:
    """The directories of one run (one fingerprint) inside ``run_dir``."""

    def __init__(self, run_dir: str | Path, fingerprint: str):
        self.run_dir = Path(run_dir)
        self.fingerprint = fingerprint
        self.root = self.run_dir / fingerprint
        self.checkpoints = self.root / "checkpoints"
        self.logs = self.root / "logs"
        self.snapshots = self.root / "snapshots"
        self.snapshot_timing = self.root / "snapshot-timing"  # beside the exports, never inside them
        self.resume_allowed = True

    def phase(self, k: int) -> Path:
        """Checkpoints of phase ``k`` (training on a deeper model before layers are removed)."""
        return self.root / "phases" / f"{k:03d}"

    def phase_logs(self, k: int) -> Path:
        """The CSV logs of phase ``k`` (``version_N`` per invocation; kept when the phase's checkpoints go)."""
        return self.root / "phase-logs" / f"{k:03d}"

    def others(self) -> list[Path]:
        """Run directories of other configurations beside this one (kept, never deleted here)."""
        if not self.run_dir.is_dir():
            return []
        return sorted(p for p in self.run_dir.iterdir() if p.is_dir() and p.name != self.fingerprint
                      and not p.name.startswith(".") and p.name != "slurm")  # slurm: the launcher's job files

    def start(self, resume: str) -> Optional[str]:
        """Decide where training starts and, on global rank 0, prepare the directories.

        ``auto`` resumes the newest complete checkpoint of this fingerprint; ``never`` starts from scratch
        (rank 0 moves this fingerprint's earlier state aside, it is not deleted); a path resumes that
        checkpoint. Global rank 0 reads the disk and decides; every rank gets its answer (:func:`rank0_decides`).
        Workers that torchrun restarted after a failure, and requeued SLURM jobs, always resume (``never`` applied
        to the first attempt).
        """
        self.resume_allowed = resume != "never" or _restarted()  # the phases' own checkpoints too
        return rank0_decides(lambda: self._start(resume))

    def _start(self, resume: str) -> Optional[str]:
        rank0 = global_rank() == 0  # distributed: rank 0 alone runs this; without a process group, every rank
        restarted = _restarted()
        if resume == "never" and restarted:
            resume = "auto"
        if restarted and resume not in ("auto", "never") and newest_complete(self.checkpoints) is not None:
            resume = "auto"  # the restarted job continues from what its first attempt wrote, not the named start
        if resume not in ("auto", "never"):
            if not Path(resume).exists():
                raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
            return resume
        if resume == "never" and rank0 and self.root.exists():
            aside = self.run_dir / f"{self.fingerprint}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            self.root.rename(aside)
            print(f"[train] --resume never: earlier state of this run moved to {aside}", flush=True)
        found = newest_complete(self.checkpoints) if resume == "auto" else None
        if rank0:
            for other in self.others():
                if other.name.split(".")[0] != self.fingerprint:
                    print(f"[train] {other} holds state of another configuration (kept)", flush=True)
            if found:
                print(f"[train] resuming from {found}", flush=True)
        return str(found) if found else None


def _restarted() -> bool:
    """Workers restarted by torchrun after a failure, or a requeued SLURM job."""
    return (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0)


class RunLock:
    """One run per run directory: global rank 0 holds an exclusive ``flock`` on ``<run_dir>/.lock`` for the
    block; the kernel releases it when the process ends, however it ends. A second run (another rank 0) is
    refused at once with a ``ValueError`` naming ``--run-dir`` and the holder; other ranks do nothing."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        import errno
        import fcntl
        import socket

        # global rank 0 only; a node's own launching process counts as rank 0 of the node, so other nodes
        # (NODE_RANK / GROUP_RANK / SLURM_NODEID) never take it
        node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID") or "0"
        if global_rank() != 0 or node != "0":
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ValueError(f"--run-dir {self.path.parent}: in use by another run ({holder}); one run per run "
                             "directory") from None
        except OSError as e:  # a file system without flock (Lustre without -o flock, some NFS mounts)
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.close(fd)
            print(f"[train] warning: {self.path.parent} cannot be locked ({e.strerror}); make sure no other run "
                  "uses this run directory", flush=True)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class AtomicCheckpoint(Callback):
    """Save a resumable checkpoint every ``every_n_steps`` optimizer steps (and at the end with
    ``save_on_train_end``), atomically, keeping the newest ``keep``.

    Args:
        dirpath: Checkpoint directory.
        every_n_steps: Interval in optimizer steps (0: only at the end when ``save_on_train_end``).
        keep: Complete checkpoints to keep.
        save_on_train_end: Also save the final step (a phase: its end state must survive a kill).
        on_saved: Called on every rank after each checkpoint is published (e.g. to delete what it supersedes).
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep: int = 1, save_on_train_end: bool = False,
                 on_saved=None):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.save_on_train_end = save_on_train_end
        self.on_saved = on_saved
        self.saved_step: Optional[int] = None  # the step this callback last published (the same on every rank)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not after an optimizer step
        # and at the last step: a kill during the final validation or the export then loses no training
        if self.every_n_steps and (trainer.global_step % self.every_n_steps == 0
                                   or trainer.global_step >= trainer.max_steps):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.save_on_train_end and trainer.global_step > 0:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        step = trainer.global_step
        final = self.dirpath / f"step{step:08d}.ckpt"
        # the last step is asked for twice (at max_steps, then at the end): known without the disk; a step written
        # before (a resumed run) is looked up by rank 0 alone, since other hosts may see its rename late
        if step == self.saved_step or trainer.strategy.broadcast(final.exists() if trainer.is_global_zero else None):
            self.saved_step = step
            return final
        partial = self.dirpath / f".step{step:08d}.ckpt.partial"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            _remove(partial)  # left by a run killed while writing this step
        trainer.strategy.barrier("checkpoint-start")
        trainer.save_checkpoint(partial)
        trainer.strategy.barrier("checkpoint-written")
        if trainer.is_global_zero:
            os.replace(partial, final)
            _fsync_dir(self.dirpath)
            for old in sorted(self.dirpath.glob(CKPT_GLOB), key=_step)[:-self.keep]:
                _remove(old)
        trainer.strategy.barrier("checkpoint-published")
        self.saved_step = step
        if self.on_saved is not None:
            self.on_saved()
        return final


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
