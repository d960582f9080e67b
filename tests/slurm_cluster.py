"""A one-node SLURM cluster on this machine (munge + slurmctld + slurmd), for tests.

Everything lives in a temporary folder: its own munge key and socket, slurm.conf, state and
logs. The daemons are stopped by their pid files at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


def available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(d) for d in DAEMONS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: str):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        for d in ("munge", "state", "spool", "log", "run"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        self.socket = os.path.join(root, "munge", "munge.socket")
        self.conf = os.path.join(root, "slurm.conf")
        self.pids = [os.path.join(root, "munge", "munged.pid"),
                     os.path.join(root, "run", "slurmctld.pid"),
                     os.path.join(root, "run", "slurmd.pid")]
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def start(self) -> "Cluster":
        r = self.root
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        subprocess.run(["munged", f"--key-file={key}", f"--socket={self.socket}",
                        f"--pid-file={self.pids[0]}", f"--log-file={r}/munge/munged.log",
                        f"--seed-file={r}/munge/munged.seed", "--force"], check=True)
        cpus = os.cpu_count() or 2
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=arktest
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.pids[1]}
SlurmdPidFile={self.pids[2]}
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
NodeName={self.host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(["slurmctld", "-f", self.conf], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", self.conf], check=True, env=self.env)
        self.wait_node_idle(timeout=30)
        return self

    def run(self, *cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env={**self.env, **kw.pop("env", {})}, **kw)

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 300) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")

    def wait_node_idle(self, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            state = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise TimeoutError(f"the test node is not idle after {timeout} s: sinfo says {state!r}")

    def stop(self) -> None:
        for pid_file in reversed(self.pids):
            try:
                with open(pid_file) as f:
                    os.kill(int(f.read().strip()), 15)
            except (OSError, ValueError):
                pass
        time.sleep(1)
