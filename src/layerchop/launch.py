"""Multi-process launch of a stage by the stage itself, so ``dvc repro`` starts the job the cluster runs.

Two launchers (``train.launcher``): ``torchrun`` (below) and ``slurm`` (:func:`run_slurm`).

``train.launcher: torchrun`` makes ``layerchop train`` (started by DVC as one process) re-run itself under
torchrun's elastic agent with ``train.num_nodes`` x ``train.devices`` worker processes, a c10d rendezvous
at ``train.rdzv_endpoint``, and ``train.max_restarts`` restarts: when a worker dies, every worker is
restarted and resumes the newest complete checkpoint. The stage exits with the job's status, so DVC
records it only when the job finished.

With ``train.simulate_nodes`` all node agents run on this host (distinct node ranks, one rendezvous on
127.0.0.1): the rehearsal profile's two simulated nodes. Without it, this host runs one agent, and every
other node must run the same command (the agents meet at the rendezvous endpoint); on SLURM clusters the
batch launcher does that.

``fabric run`` (Lightning's launcher, formerly ``lightning run model``) calls torchrun with a static
rendezvous (fixed node rank and master address, no restarts) and passes its settings in ``LT_*``
variables that only ``Fabric`` objects read. It could start these processes, but without restarts or
simulated nodes, and the ``Trainer`` would ignore its settings; so the stage calls torchrun itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence


ARGV_ENV = "LAYERCHOP_ARGV"
LAUNCHER_ENV = "LAYERCHOP_LAUNCHER"  # set to "slurm" by the batch script for the tasks srun starts


def under_launcher() -> bool:
    """True inside a worker that torchrun or a SLURM job started (the stage must run, not launch)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or under_slurm()


def under_slurm() -> bool:
    """True inside a task of a batch job that :func:`run_slurm` submitted."""
    return os.environ.get(LAUNCHER_ENV) == "slurm" and "SLURM_JOB_ID" in os.environ


def torchrun_commands(cfg, run_id: str) -> list[list[str]]:
    """One torchrun agent command per node this host runs (all of them with ``simulate_nodes``)."""
    agent = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={cfg.num_nodes}", f"--nproc-per-node={cfg.devices}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}", f"--rdzv-id={run_id}",
        f"--max-restarts={cfg.max_restarts}", "--monitor-interval=1",
    ]
    if cfg.simulate_nodes:
        agent.append("--local-addr=127.0.0.1")
    agents = cfg.num_nodes if cfg.simulate_nodes else 1
    # the stage's own arguments travel in ARGV_ENV: torchrun's parser would read some of them as its own
    return [agent + ["-m", "layerchop.cli"] for _ in range(agents)]


def rendezvous_id(fingerprint: str) -> str:
    """The same on every node of one job (each node's stage computes it), different between jobs."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"layerchop-{fingerprint}" + (f"-{job}" if job else "")


def run_torchrun(cfg, argv: list[str], run_id: str) -> int:
    """Run the stage ``argv`` (``layerchop`` arguments) under torchrun; return the job's exit status.

    Args:
        cfg: :class:`layerchop.config.TrainConfig` (topology, rendezvous, restarts).
        argv: The stage's arguments, repeated by every worker.
        run_id: Rendezvous id, identical on every node (:func:`rendezvous_id`).

    A failing agent (its workers exhausted their restarts) stops the others; SIGINT/SIGTERM to this process
    are passed on to every agent, which stop their workers.
    """
    cmds = torchrun_commands(cfg, run_id)
    print(f"[launch] torchrun: {cfg.num_nodes} node(s) x {cfg.devices} process(es), "
          f"{len(cmds)} agent(s) on this host, rendezvous {cfg.rdzv_endpoint}, max_restarts {cfg.max_restarts}",
          flush=True)
    # Restarted workers must not read the previous round's process-group addresses: with the agents' shared
    # store (torch's default) the keys of the killed workers are still there and the new gloo/NCCL mesh
    # tries to connect to dead peers. A per-round store hosted by worker rank 0 starts empty.
    from layerchop.train.flops import measured_env

    # and the workers resolve the run's plan again without counting its FLOPs again (seconds each)
    env = {**os.environ, ARGV_ENV: json.dumps(argv), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **measured_env()}
    procs = [subprocess.Popen(cmd, start_new_session=True, env=env) for cmd in cmds]

    def stop(sig=signal.SIGTERM) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def forward(signum, frame):
        stop(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                stop()
                for p in procs:
                    p.wait()
                print(f"[launch] a node agent exited with status {failed[0]}; stopped the others", flush=True)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.5)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# --- SLURM ------------------------------------------------------------------------------------------------

GPU_JOB = {"time": "12:00:00"}  # one-GPU jobs (chop, prune, evaluate, curve, bench)
CPU_JOB = {"time": "24:00:00"}  # CPU jobs (download, prepare; a stage whose device is the CPU)


@dataclasses.dataclass(frozen=True)
class JobResources:
    """What one stage's batch job asks for (per task: CPUs; per node: memory, GPUs)."""

    time: str
    cpus_per_task: int
    mem: Optional[str]
    gpus_per_node: int


def needs_accelerator(stage: str, params: dict, argv: Sequence[str] = ()) -> Optional[str]:
    """The params key whose value puts ``layerchop <stage> <argv>`` on an accelerator (e.g.
    ``"evaluate.device=cuda"``), or None when the stage runs on the CPU. ``chop`` uses its device only for
    a data-driven layout (``--layout`` or ``chop.layout``)."""
    from layerchop.config import ONE_TASK_STAGES, data_driven_layouts, section

    if stage == "train":
        cfg = section("train", params)
        return f"train.accelerator={cfg.accelerator}" if cfg.accelerator in ("gpu", "cuda") else None
    key = ONE_TASK_STAGES.get(stage)
    if key is None:
        return None
    cfg = section(key, params)
    if cfg.device == "cpu" or cfg.device.startswith("cpu:"):
        return None
    if stage == "chop":
        argv = list(argv)
        layout = argv[argv.index("--layout") + 1] if "--layout" in argv else cfg.layout
        if cfg.indices is not None and "--layout" not in argv or layout not in data_driven_layouts():
            return None  # a fixed layout: no forward pass, the device is never used
    return f"{key}.device={cfg.device}"


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def job_environment(stage: str) -> dict[str, str]:
    """Variables of a stage's batch job: every stage but ``download`` reads only local directories and caches
    (models and prepared data on the shared file system, evaluation datasets fetched beforehand by the submitting
    host: :func:`layerchop.evaluate.harness.prefetch_hub_datasets`), so its job runs with the Hub offline and a
    compute node without internet fails nowhere on a download attempt."""
    return {} if stage == "download" else dict(OFFLINE_ENV)


def job_resources(stage: str, params: dict) -> JobResources:
    """The resources of ``stage``'s batch job: ``slurm.jobs.<stage>`` where given, else the defaults (train:
    ``slurm.time`` and ``train.devices`` GPUs per node; a one-GPU job: :data:`GPU_JOB`'s time; a CPU job:
    :data:`CPU_JOB`'s; all: ``slurm.cpus_per_task`` CPUs a task, ``prepare.num_proc`` for ``prepare``, and
    ``slurm.mem``)."""
    from layerchop.config import section

    slurm = section("slurm", params)
    job = slurm.jobs.get(stage)
    if stage == "train":
        cfg = section("train", params)
        base = {"time": slurm.time, "cpus_per_task": slurm.cpus_per_task, "mem": slurm.mem,
                "gpus_per_node": cfg.devices if cfg.accelerator in ("gpu", "cuda") else 0}
    else:
        gpu = needs_accelerator(stage, params) is not None
        if stage == "chop":  # submitted: the job gets the GPU its device names, whatever the layout
            gpu = not section("chop", params).device.startswith("cpu")
        base = {**(GPU_JOB if gpu else CPU_JOB), "cpus_per_task": slurm.cpus_per_task, "mem": slurm.mem,
                "gpus_per_node": int(gpu)}
        if stage == "prepare":
            base["cpus_per_task"] = max(1, section("prepare", params).num_proc)
    if job is not None:
        for key in ("time", "cpus_per_task", "mem"):
            if getattr(job, key) is not None:
                base[key] = getattr(job, key)
        if job.gpus is not None and stage != "train":
            base["gpus_per_node"] = job.gpus
    return JobResources(**base)


def batch_script(*, job_name: str, nodes: int, tasks_per_node: int, resources: JobResources, slurm,
                 argv: list[str], log: Path, workdir: Path, python: str = sys.executable,
                 time_limit_signal: bool = True, env: Optional[dict[str, str]] = None) -> str:
    """The batch script of one stage: ``nodes`` x ``tasks_per_node`` tasks, each one rank of the stage.

    Args:
        job_name: ``--job-name``.
        nodes, tasks_per_node: The stage's geometry (``train.num_nodes``, ``train.devices``; 1 x 1 for the others).
        resources: Time limit, CPUs per task, memory and GPUs per node (:func:`job_resources`).
        slurm: :class:`layerchop.config.SlurmConfig` (partition, account, signal, requeue, passthrough).
        argv: The stage's own arguments (``layerchop`` arguments), repeated by every task.
        log: The job's output file; opened in append mode, so a requeued job adds to it.
        workdir: The directory the stage runs in (the repository, on a file system every node sees).
        python: The interpreter of the environment the stage was started from.
        time_limit_signal: Ask for ``--signal=USR1@slurm.signal_seconds`` (only stages that handle it: train;
            SIGUSR1 would end any other stage early).
        env: Variables exported in the job before ``srun`` (e.g. the Hub offline for evaluation jobs).

    Every task runs ``python -m layerchop.cli <argv>`` with ``LAYERCHOP_LAUNCHER=slurm``: it trains, reading
    its rank from SLURM's variables (Lightning's ``SLURMEnvironment``). ``--signal=USR1@N`` warns the tasks
    before the time limit: the run checkpoints at its next optimizer step and requeues the job
    (:class:`layerchop.train.callbacks.RequeueOnSignal`); the requeued job resumes that checkpoint.
    """
    opts = [
        f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
        f"--cpus-per-task={resources.cpus_per_task}", f"--time={resources.time}", f"--output={log}",
        "--open-mode=append", f"--chdir={workdir}",
    ]
    if resources.gpus_per_node:
        opts.append(f"--gpus-per-node={resources.gpus_per_node}")
    if slurm.partition:
        opts.append(f"--partition={slurm.partition}")
    if slurm.account:
        opts.append(f"--account={slurm.account}")
    if resources.mem:
        opts.append(f"--mem={resources.mem}")
    opts.append("--requeue" if slurm.requeue else "--no-requeue")
    if slurm.signal_seconds and time_limit_signal:
        opts.append(f"--signal=USR1@{slurm.signal_seconds}")
    opts += slurm.sbatch_args
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts), "set -eo pipefail", *slurm.setup,
             f"export {LAUNCHER_ENV}=slurm",
             *(f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()),
             "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun does not inherit --cpus-per-task (22.05+)",
             'echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: '
             '$SLURM_NNODES node(s) x $SLURM_NTASKS_PER_NODE task(s), $(date -u +%FT%TZ)"',
             "srun --kill-on-bad-exit=1 " + " ".join(shlex.quote(a) for a in [python, "-m", "layerchop.cli", *argv])]
    return "\n".join(lines) + "\n"


def run_slurm(script: str, script_path: Path, log: Path, poll_seconds: float = 2.0, out=None) -> int:
    """Submit ``script`` with ``sbatch --wait``, copy the job's log to ``out`` while it runs, return its status.

    The job's exit status becomes the stage's, so DVC records the stage only when the job finished; a job that
    SLURM requeues (preemption, or the run's own requeue before its time limit) keeps ``sbatch --wait``
    waiting until the requeued job ends. SIGINT/SIGTERM to this process cancel the job (``scancel``).
    """
    import shutil

    out = out or sys.stdout
    if shutil.which("sbatch") is None:
        raise ValueError("launcher slurm (train.launcher or slurm.stages): sbatch not found on this host (run dvc "
                         "repro on a SLURM login node, or launch locally)")
    script_path.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    offset = log.stat().st_size if log.exists() else 0  # the log is appended to: show only this job's lines
    done = threading.Event()
    job_id = ""
    proc = None
    interrupted: list[int] = []

    def follow() -> None:
        nonlocal offset
        while True:
            finished = done.is_set()
            if log.exists():
                with open(log, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                if chunk:
                    out.write(chunk.decode(errors="replace"))
                    out.flush()
            if finished:
                return
            done.wait(poll_seconds)

    def cancel(signum, frame) -> None:
        interrupted.append(signum)
        if job_id:
            subprocess.run(["scancel", job_id], check=False)
            print(f"[launch] slurm: job {job_id} cancelled", flush=True)
        elif proc is not None:
            proc.terminate()

    # handlers and the log follower first: a Ctrl-C at any moment cancels, and the log streams whenever sbatch
    # prints the id (22.05 prints it at submission; the follower does not depend on it)
    old = {s: signal.signal(s, cancel) for s in (signal.SIGINT, signal.SIGTERM)}
    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        proc = subprocess.Popen(["sbatch", "--parsable", "--wait", str(script_path)], stdout=subprocess.PIPE,
                                text=True)
        job_id = (proc.stdout.readline().strip().split(";") or [""])[0]
        if job_id:
            print(f"[launch] slurm: job {job_id} submitted ({script_path}); its log: {log}; Ctrl-C cancels it",
                  flush=True)
        rc = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        done.set()
        follower.join()
    if not job_id:
        if interrupted:  # Ctrl-C before sbatch printed the id: a job it may have submitted goes too
            name = re.search(r"^#SBATCH --job-name=(\S+)$", script, re.M)
            if name:
                subprocess.run(["scancel", f"--name={name.group(1)}", f"--user={os.getuid()}"], check=False)
            return 128 + interrupted[0]
        return rc or 1  # sbatch refused the script; its own message is on stderr
    print(f"[launch] slurm: job {job_id} ended with status {rc}", flush=True)
    if interrupted:  # cancelled from here: never a success, whatever sbatch --wait reports for a cancelled job
        return 128 + interrupted[0]
    return rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention


_TIME_LIMIT = threading.Event()


def catch_time_limit_signal() -> None:
    """Under a SLURM job: from now on SIGUSR1 (``--signal=USR1@N``, the time-limit warning) only sets a flag that
    training reads at its next optimizer step (:class:`~layerchop.train.callbacks.RequeueOnSignal`); it never
    ends the process, whenever it comes (model loading, between the warm start and the main run, export)."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: _TIME_LIMIT.set())


def time_limit_signalled() -> bool:
    return _TIME_LIMIT.is_set()


def clear_time_limit_signal() -> None:
    _TIME_LIMIT.clear()


def requeue_this_job() -> bool:
    """``scontrol requeue`` of the SLURM job this process runs in; True when SLURM accepted it."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        print("[train] scontrol not found: the job cannot requeue itself", flush=True)
        return False
    if result.returncode:
        print(f"[train] scontrol requeue {job} failed: {result.stderr.strip()}", flush=True)
    return result.returncode == 0
