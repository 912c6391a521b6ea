"""``train.launcher: slurm`` against a real SLURM: a local cluster (Debian's slurm-wlm, started by
``tests/slurm/local_cluster.sh``) of two nodes, each a network namespace with its own address and host name
(one node on 127.0.0.1 where namespaces cannot be made); the stage submitting itself with ``sbatch --wait``
from ``dvc repro``, a 2-rank job on two nodes, a job interrupted by the time-limit signal and by a requeue,
a failing job, Ctrl-C cancelling a job, a one-task stage as a job.

Marked ``slurm``: the tests skip, with the reason, where the cluster cannot start (not root, slurm-wlm not
installed); ``.ci/run`` installs it. The batch-script tests need no cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from test_rehearsal import check, layerchop_train, losses_and_val, max_abs_diff, rehearsal_params

CLUSTER = Path(__file__).parent / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running local SLURM (two nodes where network namespaces can be made, else one), stopped after the
    module's tests (its jobs cancelled). ``LAYERCHOP_SLURM_NODES=2`` makes a one-node fallback an error."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (munged and slurmd run as root)")
    try:
        start = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)
        pytest.skip("the local SLURM cluster did not start within 300 s")
    if start.returncode:
        pytest.skip(f"the local SLURM cluster did not start: {(start.stderr or start.stdout).strip()}")
    print(start.stdout.strip(), start.stderr.strip())
    if os.environ.get("LAYERCHOP_SLURM_NODES") == "2" and len(cluster_nodes()) < 2:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)
        pytest.fail(f"two nodes were asked for and one started: {start.stderr.strip()}")
    yield
    subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


# the rehearsal profile (bf16 FSDP2, activation checkpointing, accumulation, warm start) through the SLURM
# launcher, 2 ranks: 2 nodes x 1 task on the two-node cluster (as on a real one: the ranks on different hosts
# with their own addresses and names), 1 node x 2 tasks where the cluster has one node
SLURM = dict(launcher="slurm", simulate_nodes=False, token_budget=12 * 2 * 2 * 2 * 32, warm_start_steps=4,
             warmup_steps=2, val_every=0, ckpt_every=3, max_restarts=0)


def cluster_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    return sorted(set(out))


def geometry() -> dict:
    """2 nodes x 1 task where the cluster has two nodes, else 1 node x 2 tasks."""
    return dict(num_nodes=2, devices=1) if len(cluster_nodes()) >= 2 else dict(num_nodes=1, devices=2)


def slurm_params(tmp_path: Path, slurm: dict | None = None, **train) -> Path:
    path = rehearsal_params(tmp_path, **{**SLURM, **geometry(), **train})
    params = yaml.safe_load(path.read_text())
    params["slurm"] = {"time": "30", "cpus_per_task": 1, "signal_seconds": 0, "poll_seconds": 0.5,
                       **(slurm or {})}
    path.write_text(yaml.safe_dump(params))
    return path


def job_id(run_dir: Path, timeout: float = 120) -> str:
    """The id of the job the stage submitted for ``run_dir`` (from its log line, as a user would read it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for log in run_dir.glob("slurm/*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("[slurm] job "):
                    return line.split()[2]
        time.sleep(0.2)
    raise AssertionError(f"no job started for {run_dir}")


def wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def job_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    return out or "GONE"


def start_now_once_requeued(job: str) -> None:
    """A requeued job waits ~120 s (SLURM's BeginTime); start it at once, as an idle cluster would soon."""
    wait_for(lambda: job_state(job) == "PENDING", f"job {job} back in the queue")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def test_batch_script_carries_geometry_limits_and_the_stage():
    from layerchop.config import SlurmConfig
    from layerchop.launch import JobResources, batch_script

    slurm = SlurmConfig(partition="gpu", account="proj1", signal_seconds=900, sbatch_args=["--qos=high"],
                        setup=["module load cuda/12.4"])
    script = batch_script(job_name="layerchop-train-x", nodes=4, tasks_per_node=8,
                          resources=JobResources(time="2-00:00:00", cpus_per_task=12, mem="500G", gpus_per_node=8),
                          slurm=slurm, argv=["train", "--init", "data/models/a b", "--warm-start"],
                          log=Path("/r/x.log"), workdir=Path("/repo"), python="/env/bin/python",
                          env={"HF_HUB_OFFLINE": "1"})
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    options = [line.split(" ", 1)[1] for line in lines if line.startswith("#SBATCH ")]
    assert options == ["--job-name=layerchop-train-x", "--nodes=4", "--ntasks-per-node=8", "--cpus-per-task=12",
                       "--time=2-00:00:00", "--output=/r/x.log", "--open-mode=append", "--chdir=/repo",
                       "--gpus-per-node=8", "--partition=gpu", "--account=proj1", "--mem=500G", "--requeue",
                       "--signal=USR1@900", "--qos=high"]
    body = [line for line in lines if not line.startswith("#")]
    assert body.index("module load cuda/12.4") < body.index("export LAYERCHOP_LAUNCHER=slurm")
    assert any(line.startswith("export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK") for line in body)
    assert "export HF_HUB_OFFLINE=1" in body
    assert body[-1] == "srun --kill-on-bad-exit=1 /env/bin/python -m layerchop.cli train --init 'data/models/a b' " \
                       "--warm-start"
    cpu = batch_script(job_name="j", nodes=1, tasks_per_node=2,
                       resources=JobResources(time="1:00:00", cpus_per_task=2, mem=None, gpus_per_node=0),
                       slurm=SlurmConfig(signal_seconds=0, requeue=False), argv=["train"], log=Path("/l"),
                       workdir=Path("/w"))
    assert "--no-requeue" in cpu and "gpus" not in cpu and "--signal" not in cpu


def test_jobs_run_with_the_hub_offline_after_the_submitting_host_fetched_the_evaluation_data(monkeypatch):
    """Every job but download's has the Hub offline; before an evaluation job, the submitting host loads the
    datasets of the tasks lm-eval reads from the Hub (not the local mirrors, not prepare's offline tasks)."""
    import lm_eval.tasks

    from layerchop.config import EvaluateConfig
    from layerchop.evaluate.harness import hub_tasks, prefetch_hub_datasets
    from layerchop.launch import job_environment

    assert job_environment("evaluate") == job_environment("train") == {"HF_HUB_OFFLINE": "1",
                                                                       "HF_DATASETS_OFFLINE": "1"}
    assert job_environment("download") == {}
    loaded = []
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", lambda names, tm: loaded.append(list(names)) or {})
    embedded = EvaluateConfig()  # heldout_* from prepare, piqa from a local mirror
    assert hub_tasks(embedded) == [] and prefetch_hub_datasets(embedded) == [] and loaded == []
    paper = EvaluateConfig(tasks=["piqa", "hellaswag", "heldout_continuation", "arc_easy"], local_tasks={},
                           optional_tasks=[])
    assert prefetch_hub_datasets(paper) == ["piqa", "hellaswag", "arc_easy"] == loaded[0]


def test_time_limit_signal_never_ends_the_process():
    """Inside a SLURM job the train stage installs its SIGUSR1 handler first thing: a time-limit warning that
    arrives outside ``fit`` (loading, between the warm start and the main run, export) sets the flag the next
    optimizer step reads instead of killing the task (SIGUSR1's default action)."""
    import signal

    from layerchop.launch import catch_time_limit_signal, clear_time_limit_signal, time_limit_signalled

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        catch_time_limit_signal()
        assert not time_limit_signalled()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert time_limit_signalled()  # still alive, and the flag is up
        clear_time_limit_signal()
        assert not time_limit_signalled()
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, slurm_cluster, shape_dirs, tiny_prepared):
    """A DVC project with one train stage, ``launcher: slurm``, after ``dvc repro`` (the uninterrupted run the
    other tests compare with). Returns (project directory, the repro's completed process, its wall time)."""
    root = tmp_path_factory.mktemp("slurm-dvc")
    for name in ("chopped", "dense"):
        shutil.copytree(shape_dirs / name, root / name)
    shutil.copytree(tiny_prepared, root / "prepared")
    shutil.copy(slurm_params(root), root / "params.yaml")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "layerchop train --warm-start --init chopped --data prepared --out out --run-dir run "
               "--log out.csv --metrics out.json",
        "deps": ["chopped", "dense", "prepared"], "params": ["train"], "outs": ["out"],
        "metrics": [{"out.json": {"cache": False}}]}}}))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=dvc_env())
    t0 = time.perf_counter()
    repro = subprocess.run(["dvc", "repro"], cwd=root, env=dvc_env(), capture_output=True, text=True, timeout=900)
    return root, repro, time.perf_counter() - t0


def dvc_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "LAYERCHOP_ARGV"},
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.mark.slurm
def test_dvc_repro_runs_the_stage_as_a_two_task_job(dvc_project):
    """``dvc repro`` of a train stage with ``launcher: slurm``: the stage submits one job of 2 tasks (on two
    nodes, one each, where the local cluster has two: rank 1 on the second host), streams the job's log,
    exits with its status; DVC records the stage."""
    root, repro, wall = dvc_project
    print(f"dvc repro through SLURM: {wall:.1f} s")
    check(repro)
    log = repro.stdout + repro.stderr
    assert "[launch] slurm: job" in log and "ended with status 0" in log
    two_nodes = geometry()["num_nodes"] == 2
    # the job's own log, streamed
    shape = "on lc[1-2]: 2 node(s) x 1 task(s)" if two_nodes else "1 node(s) x 2 task(s)"
    assert "[slurm] job" in log and shape in log
    assert "[train] 12 steps (4 warm)" in log and "exported out" in log
    status = subprocess.run(["dvc", "status", "--json"], cwd=root, env=dvc_env(), capture_output=True, text=True)
    assert json.loads(status.stdout) == {}
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert [o["path"] for o in lock["stages"]["train"]["outs"]] == ["out", "out.json"]
    memory = json.loads((root / "out.json").read_text())["host_memory"]
    assert {rank: m["node"] for rank, m in memory.items()} == ({"rank0": 0, "rank1": 1} if two_nodes else
                                                               {"rank0": 0, "rank1": 0})
    if two_nodes:  # two hosts in fact: each rank's own host name (its node's UTS namespace)
        assert {rank: m["host"] for rank, m in memory.items()} == {"rank0": "lc1", "rank1": "lc2"}


def run_in_background(params: Path, init: Path, data: Path, out: Path, new_session: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "layerchop.cli", "train", "--params", str(params), "--init", str(init),
           "--data", str(data), "--out", str(out), "--run-dir", str(out.parent / f"run-{out.name}"),
           "--log", str(out.parent / f"{out.name}.csv"), "--warm-start"]
    env = {k: v for k, v in os.environ.items() if k != "LAYERCHOP_ARGV"}
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=new_session)


def interrupt_and_finish(params: Path, tmp_path: Path, shape_dirs: Path, data: Path, interruptions: list) -> str:
    """Run the stage in the background; for each ``(when, what, action)`` in turn wait for ``when``, run
    ``action + [job id]`` on its job and start the requeued job at once; return the stage's output once it
    finished with status 0."""
    proc = run_in_background(params, shape_dirs / "chopped", data, tmp_path / "out")
    try:
        job = job_id(tmp_path / "run-out")
        for when, what, action in interruptions:
            wait_for(when, what)
            subprocess.run([*action, job], check=True)
            start_now_once_requeued(job)
        out, _ = proc.communicate(timeout=600)
    finally:
        cancel_and_kill(proc, tmp_path / "run-out")
    assert proc.returncode == 0, out[-5000:]
    return out


def cancel_and_kill(proc: subprocess.Popen, run_dir: Path) -> None:
    """After a test's stage process: kill it and, if it failed or timed out, cancel its job (not left
    training during the next tests)."""
    if proc.poll() is None:
        proc.kill()
        try:
            subprocess.run(["scancel", job_id(run_dir, timeout=1)], check=False)
        except AssertionError:
            pass


def assert_same_weights(dvc_project, tmp_path: Path) -> None:
    """The interrupted run's weights equal the uninterrupted ``dvc repro`` run's, bit for bit."""
    ref, repro, _ = dvc_project
    check(repro)
    a, b = load_file(ref / "out" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert max_abs_diff(a, b) == 0.0


def steps_logged(tmp_path: Path, pattern: str, steps: int) -> bool:
    """Whether a CSV log under ``tmp_path`` matching ``pattern`` has ``steps`` rows (it is flushed each step)."""
    return any(len(p.read_text().splitlines()) > steps for p in tmp_path.glob(pattern))


@pytest.mark.slurm
def test_time_limit_signal_then_requeue_resume_to_the_uninterrupted_result(tmp_path, dvc_project, shape_dirs,
                                                                          tiny_prepared):
    """Two interruptions of one job. First SIGUSR1 (what ``--signal=USR1@N`` sends before the time limit)
    during the warm start on the dense model: the ranks checkpoint the step they are at and the job requeues
    itself. The requeued job resumes exactly the checkpoint the signal wrote (named in the log), finishes the
    warm start and starts the chopped run; then ``scontrol requeue`` (a preemption) after the chopped
    run's first checkpoint: SLURM kills the job and runs it again, and it resumes that checkpoint. The stage
    (in ``sbatch --wait`` all along) ends when the last job ends, with the uninterrupted run's weights and
    losses."""
    out = interrupt_and_finish(slurm_params(tmp_path, slurm={"signal_seconds": 300}), tmp_path, shape_dirs,
                               tiny_prepared, [
        (lambda: steps_logged(tmp_path, "run-out/*/phase-logs/000/version_*/metrics.csv", 1), "a step of the warm start",
         ["scancel", "--signal=USR1"]),
        (lambda: list((tmp_path / "run-out").glob("*/checkpoints/step*.ckpt")), "the chopped run's first checkpoint",
         ["scontrol", "requeue"])])
    assert "(restart 1)" in out and "(restart 2)" in out
    signalled = [line.split("checkpoint ", 1)[1].split(" written")[0] for line in out.splitlines()
                 if "SLURM time-limit signal: checkpoint" in line]
    resumed = [line.split("resuming from ", 1)[1].strip() for line in out.splitlines() if "resuming from" in line]
    assert len(signalled) == 1 and "/phases/000/step" in signalled[0], signalled  # written in the warm start
    assert len(resumed) == 2, resumed
    assert resumed[0] == signalled[0]  # the requeued job resumed the checkpoint the signal wrote
    assert "/checkpoints/step" in resumed[1]
    assert_same_weights(dvc_project, tmp_path)
    ref = dvc_project[0]
    assert losses_and_val(ref / "out.csv")[0] == losses_and_val(tmp_path / "out.csv")[0]


@pytest.mark.slurm
def test_failing_job_fails_the_stage_with_its_error(tmp_path, slurm_cluster, shape_dirs, tiny_prepared):
    """A job that fails on the cluster (here its setup line, as a missing module would) makes the stage exit
    with the job's status, the job's own error in the stage's output, and no output directory."""
    params = slurm_params(tmp_path, slurm={"setup": ["echo 'module: cuda/12.4 not found' >&2", "exit 3"]})
    proc = layerchop_train(params, shape_dirs / "chopped", tiny_prepared, tmp_path / "out", "--warm-start")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "module: cuda/12.4 not found" in proc.stdout
    assert "layerchop train: failed with status 3" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slurm
def test_one_task_stage_runs_as_a_job_with_the_local_result(tmp_path, slurm_cluster, tiny_dir, tiny_prepared):
    """``slurm.stages: [prune]``: the prune stage submits itself as a one-task job (no time-limit signal: it
    does not handle one) and writes what the same stage writes locally, byte for byte."""
    params = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    params["prune"].update(num_calibration=4, batch_size=2)
    params["slurm"] = {"time": "10", "cpus_per_task": 1, "job_dir": str(tmp_path / "jobs"), "poll_seconds": 0.5}
    paths = {}
    for launcher in ("local", "slurm"):
        params["slurm"]["stages"] = ["prune"] if launcher == "slurm" else []
        paths[launcher] = tmp_path / f"params-{launcher}.yaml"
        paths[launcher].write_text(yaml.safe_dump(params))
    outs = {}
    for launcher in ("local", "slurm"):
        outs[launcher] = tmp_path / f"out-{launcher}"
        proc = subprocess.run([sys.executable, "-m", "layerchop.cli", "prune", "--params", str(paths[launcher]),
                               "--method", "wanda", "--pattern", "2of4", "--model", str(tiny_dir), "--data",
                               str(tiny_prepared), "--out", str(outs[launcher])], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=dvc_env())
        check(proc)
    assert "[launch] slurm: job" in proc.stdout and "ended with status 0" in proc.stdout
    script = (tmp_path / "jobs" / "prune-out-slurm.sbatch").read_text()
    assert "--ntasks-per-node=1" in script and "--signal" not in script
    a, b = load_file(outs["local"] / "model.safetensors"), load_file(outs["slurm"] / "model.safetensors")
    assert max_abs_diff(a, b) == 0.0


@pytest.mark.slurm
def test_evaluation_job_runs_with_the_hub_offline(tmp_path, slurm_cluster, tiny_dir, tiny_prepared):
    """``slurm.stages: [evaluate]``: the job exports HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (the submitting host
    fetched what the Hub serves beforehand; these tasks need nothing from it) and runs on a node whose network
    namespace reaches only the cluster's bridge; its metrics equal the same stage's run here."""
    params = yaml.safe_load(open(Path(__file__).resolve().parents[1] / "params.yaml"))
    params["evaluate"].update(tasks=["heldout_continuation", "heldout_lastword"], local_tasks={}, optional_tasks=[],
                              limit=8, ppl_max_sequences=4, batch_size=4)
    params["slurm"] = {"time": "10", "cpus_per_task": 1, "job_dir": str(tmp_path / "jobs"), "poll_seconds": 0.5}
    outs = {}
    for launcher in ("local", "slurm"):
        params["slurm"]["stages"] = ["evaluate"] if launcher == "slurm" else []
        path = tmp_path / f"params-{launcher}.yaml"
        path.write_text(yaml.safe_dump(params))
        outs[launcher] = tmp_path / f"eval-{launcher}"
        proc = subprocess.run([sys.executable, "-m", "layerchop.cli", "evaluate", "--params", str(path), "--model",
                               str(tiny_dir), "--data", str(tiny_prepared), "--out", str(outs[launcher])],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dvc_env())
        check(proc)
    assert "[launch] slurm: job" in proc.stdout and "ended with status 0" in proc.stdout
    script = (tmp_path / "jobs" / "evaluate-eval-slurm.sbatch").read_text()
    assert "export HF_HUB_OFFLINE=1" in script and "export HF_DATASETS_OFFLINE=1" in script
    local, job = (json.loads((outs[k] / "metrics.json").read_text()) for k in ("local", "slurm"))
    scores = [k for k in local if k.startswith(("eval/", "val_", "test_")) and not k.endswith("_s")]
    assert scores and {k: job[k] for k in scores} == {k: local[k] for k in scores}


@pytest.mark.slurm
def test_ctrl_c_cancels_the_job_and_fails_the_stage(tmp_path, slurm_cluster, shape_dirs, tiny_prepared):
    """Ctrl-C while the stage's job runs: SIGINT to the stage's whole process group, as a terminal sends it
    (``sbatch --wait`` gets it too). The job is cancelled (gone from the queue, not left training), and the
    stage exits 130 with no output directory, so DVC records nothing."""
    import signal

    proc = run_in_background(slurm_params(tmp_path), shape_dirs / "chopped", tiny_prepared, tmp_path / "out",
                             new_session=True)
    try:
        job = job_id(tmp_path / "run-out")
        wait_for(lambda: job_state(job) == "RUNNING", f"job {job} running")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        cancel_and_kill(proc, tmp_path / "run-out")
    assert proc.returncode == 130, out[-3000:]
    assert f"[launch] slurm: job {job} cancelled" in out
    wait_for(lambda: job_state(job) == "GONE", f"job {job} gone from the queue", timeout=60)
    assert not (tmp_path / "out").exists()
