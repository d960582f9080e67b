"""slurm/opd.sbatch on real SLURM clusters (munge, slurmctld, slurmd from Debian's slurm-wlm
packages, which .ci/run installs). One node, two processes: a job that runs to completion. Two
nodes (network namespaces joined by a veth pair), one process each: a job that is sent USR1
mid-run, saves, is requeued and resumes without repeating or losing a step, with the c10d
rendezvous and gloo across the nodes. Where namespaces cannot be made, the preemption runs on the
one-node cluster instead: the requeue path is the same."""

import json
import os
import socket
import sys
import time
import uuid

import pytest

import slurm_cluster
from opd_setup import ROOT, tokenizer

pytestmark = pytest.mark.skipif(not slurm_cluster.available(),
                                reason="SLURM (slurm-wlm, munge) is not installed, or not root")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_cluster.Cluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def preemptible(request, tmp_path_factory):
    """The cluster the preemption runs on: two nodes where namespaces can be made, else one."""
    why = slurm_cluster.namespaces_unavailable()
    if why:
        request.config.stash[slurm_cluster.ONE_NODE_PREEMPTION] = why
        yield request.getfixturevalue("cluster")
        return
    c = slurm_cluster.Cluster(str(tmp_path_factory.mktemp("slurm2")), nodes=2).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurmcfg")
    tok = d / "tokenizer.json"
    tokenizer().save(str(tok))
    path = d / "sft.yaml"
    path.write_text(f"""stage: sft
student:
  preset: tiny_ark_asr
  tokenizer: {tok}
  overrides: {{decoder.vocab_size: 384, encoder.num_mel_bins: 128}}
data: {{train: examples/data/train.jsonl, heldout: null, max_tokens: 1500, num_workers: 0, subset: 0.2}}
optim: {{lr: 1.0e-3, weight_decay: 0.0}}
""")
    return path


def submit(cluster, config, *overrides, nodes=1):
    """Submit under a fresh job name: a new test cluster restarts job ids at 1, and job logs
    (logs/<name>-<id>.out) are appended to. One node: two processes on a free rendezvous port.
    Two nodes: one process each, on the port the script derives from the job id (the nodes'
    namespaces are fresh, nothing else listens there)."""
    name = f"ark-test-{uuid.uuid4().hex[:8]}"
    env = {"OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "NPROC_PER_NODE": str(2 // nodes)}
    if nodes == 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    proc = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0",
                       f"--cpus-per-task={2 // nodes}", f"--job-name={name}", "slurm/opd.sbatch",
                       "--config", str(config), *overrides, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], name


def steps_logged(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def log_of(job):
    job_id, name = job
    return open(os.path.join(ROOT, "logs", f"{name}-{job_id}.out")).read()


@pytest.mark.parametrize("job_id,master_port,port", [("42", "", 20042), ("20043", "", 20043),
                                                      ("42", "29511", 29511)])
def test_dry_run_prints_the_launch_command(cluster, config, job_id, master_port, port):
    proc = cluster.run("bash", "slurm/opd.sbatch", "--config", str(config), cwd=ROOT,
                       env={"DRY_RUN": "1", "SLURM_JOB_NODELIST": cluster.host,
                            "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": job_id,
                            "NPROC_PER_NODE": "8", "MASTER_PORT": master_port})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (  # the port follows the job id unless MASTER_PORT is set
        f"{cluster.host}: python3 -m torch.distributed.run --nnodes 1 --nproc_per_node 8 "
        f"--rdzv_backend c10d --rdzv_endpoint {cluster.host}:{port} --rdzv_id {job_id} "
        f"examples/train_opd.py --config {config}")


def test_job_completes_with_checkpoint_and_metrics(cluster, config, tmp_path):
    job = submit(cluster, config, f"output_dir={tmp_path}", "steps=6", "save_every=3")
    info = cluster.wait(job[0])
    assert info["JobState"] == "COMPLETED", log_of(job)[-3000:]
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000003", "step_000006"]


def preempt_and_resume(cluster, job, out_dir, steps):
    """USR1 once the run is well under way; the job saves and requeues itself; start the
    requeued job and check that it resumed and completed with steps 1..N logged once. Returns
    the job's log."""
    for _ in range(240):
        if os.path.exists(out_dir / "metrics.jsonl") and len(steps_logged(out_dir)) >= 8:
            break
        time.sleep(0.5)
    assert cluster.run("scancel", "--signal=USR1", job[0]).returncode == 0
    cluster.wait(job[0], states=("PENDING", "COMPLETED", "FAILED"), timeout=120)
    for _ in range(120):  # requeued jobs wait for a begin time: start it now
        info = cluster.job(job[0])
        if info.get("Restarts") == "1":
            break
        time.sleep(0.5)
    assert info.get("Restarts") == "1", log_of(job)[-3000:]
    # slurmd revokes the first instance's credential when it ends, at one-second resolution:
    # a relaunch of the same job id whose credential is dated in that second is killed
    # ("Job credential revoked"). Start it only once the nodes are idle again (the revocation
    # is done) and the clock has moved past that second.
    cluster.wait_node_idle()
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job[0]}", "StartTime=now")
    info = cluster.wait(job[0])
    log = log_of(job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    saved = int(log.split("USR1: saved step ")[1].split()[0])
    assert 8 <= saved < steps and "resumed from" in log and "(restart 1)" in log
    assert steps_logged(out_dir) == list(range(1, steps + 1))  # no step repeated or lost
    assert sorted(os.listdir(out_dir / "checkpoints"))[-2:] == [f"step_{saved:06d}", f"step_{steps:06d}"]
    return log


def test_usr1_saves_requeues_and_resumes(preemptible, config, tmp_path):
    nodes = len(preemptible.hosts)
    job = submit(preemptible, config, f"output_dir={tmp_path}", "steps=60", "save_every=1000",
                 nodes=nodes)
    log = preempt_and_resume(preemptible, job, tmp_path, 60)
    assert f"on {nodes} node(s)" in log
    assert log.count("2 ranks (DP 2, TP 1, PP 1)") == 2  # in both instances
    if nodes == 2:  # one rank per node, the rendezvous on the first at the job-id port
        assert f"--rdzv_endpoint {preemptible.host}:{20000 + int(job[0])}" in log
