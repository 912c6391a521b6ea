"""Multi-process launch of a stage by the stage itself, so ``dvc repro`` starts the job the cluster runs.

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

import json
import os
import signal
import subprocess
import sys
import time


ARGV_ENV = "LAYERCHOP_ARGV"


def under_launcher() -> bool:
    """True inside a worker that torchrun started (the stage must run, not launch)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


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
    env = {**os.environ, ARGV_ENV: json.dumps(argv), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
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
