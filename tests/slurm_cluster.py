"""A SLURM cluster on this machine (munge + slurmctld + slurmd), for tests.

One node: the daemons run on this host. Two nodes: each node is a network namespace with its
own address (10.77.<n>.1-2 on a veth pair between them), hostname (a UTS namespace) and
/etc/hosts (bind-mounted in a mount namespace), with one slurmd each; slurmctld, the client
commands and the jobs' first node live in the first. munged is shared (its socket is a file).
Everything else lives in a temporary folder: munge key and socket, slurm.conf, state, logs.
The daemons are stopped by their pid files, and the namespaces deleted, at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
# why the preemption test ran on one node, for the run's summary (tests/conftest.py): pytest's
# configuration silences warnings
ONE_NODE_PREEMPTION = pytest.StashKey[str]()


def available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(d) for d in DAEMONS)


def namespaces_unavailable() -> str | None:
    """Why two namespace nodes cannot be made here, or None when they can."""
    if not shutil.which("ip") or not shutil.which("nsenter") or not shutil.which("unshare"):
        return "needs ip (iproute2), nsenter and unshare"
    name = f"arkprobe{os.getpid() % 100000}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: str, nodes: int = 1):
        assert nodes in (1, 2), "a one- or two-node test cluster"
        self.root = root
        tag = f"{os.getpid() % 100000}"
        if nodes == 1:
            self.hosts, self.addresses, self.netns = [socket.gethostname().split(".")[0]], [None], []
        else:
            subnet = 10 + os.getpid() % 200  # a private range, only inside these namespaces
            self.hosts = [f"arkn{tag}a", f"arkn{tag}b"]
            self.addresses = [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]
            self.netns = [f"ark{tag}a", f"ark{tag}b"]
        self.host = self.hosts[0]
        for d in ("munge", "state", "log", "run", *(f"spool/{h}" for h in self.hosts)):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        self.socket = os.path.join(root, "munge", "munge.socket")
        self.conf = os.path.join(root, "slurm.conf")
        self.hosts_file = os.path.join(root, "hosts")
        self.pids = [os.path.join(root, "munge", "munged.pid"),
                     os.path.join(root, "run", "slurmctld.pid"),
                     *(os.path.join(root, "run", f"slurmd-{h}.pid") for h in self.hosts)]
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def on(self, node: int, cmd: list[str]) -> list[str]:
        """`cmd` as run on node `node`: in its namespaces when the cluster has two."""
        if not self.netns:
            return cmd
        inner = (f"mount --bind {self.hosts_file} /etc/hosts && hostname {self.hosts[node]} "
                 '&& exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "-m", "-u",
                "sh", "-c", inner, "_", *cmd]

    def _network(self) -> None:
        a, b = self.netns
        veth = [f"{n}v" for n in self.netns]
        for cmd in (["netns", "add", a], ["netns", "add", b],
                    ["link", "add", veth[0], "type", "veth", "peer", "name", veth[1]]):
            subprocess.run(["ip", *cmd], check=True)
        for ns, dev, addr in zip(self.netns, veth, self.addresses):
            subprocess.run(["ip", "link", "set", dev, "netns", ns], check=True)
            for cmd in (["addr", "add", f"{addr}/24", "dev", dev], ["link", "set", dev, "up"],
                        ["link", "set", "lo", "up"]):
                subprocess.run(["ip", "-n", ns, *cmd], check=True)
        with open(self.hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for ip, h in zip(self.addresses, self.hosts)))

    def start(self) -> "Cluster":
        r = self.root
        if self.netns:
            self._network()
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        subprocess.run(["munged", f"--key-file={key}", f"--socket={self.socket}",
                        f"--pid-file={self.pids[0]}", f"--log-file={r}/munge/munged.log",
                        f"--seed-file={r}/munge/munged.seed", "--force"], check=True)
        cpus = (os.cpu_count() or 2) // len(self.hosts)
        ctld = f"{self.host}({self.addresses[0]})" if self.netns else self.host
        nodes = "".join(f"NodeName={h}{f' NodeAddr={a}' if a else ''} CPUs={cpus} RealMemory=4000 State=UNKNOWN\n"
                        for h, a in zip(self.hosts, self.addresses))
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=arktest
SlurmctldHost={ctld}
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
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={self.pids[1]}
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(self.on(0, ["slurmctld", "-f", self.conf]), check=True, env=self.env)
        for node in range(len(self.hosts)):
            subprocess.run(self.on(node, ["slurmd", "-f", self.conf]), check=True, env=self.env)
        self.wait_node_idle(timeout=30)
        return self

    def run(self, *cmd, **kw) -> subprocess.CompletedProcess:
        """A command on the first node (where slurmctld listens)."""
        return subprocess.run(self.on(0, list(cmd)), capture_output=True, text=True,
                              env={**self.env, **kw.pop("env", {})}, **kw)

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
        """Until every node is idle."""
        end = time.time() + timeout
        while time.time() < end:
            states = set(self.run("sinfo", "-h", "-N", "-o", "%t").stdout.split())
            if states == {"idle"}:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the test nodes are not idle after {timeout} s: sinfo says {states}")

    def stop(self) -> None:
        for pid_file in reversed(self.pids):
            try:
                with open(pid_file) as f:
                    os.kill(int(f.read().strip()), 15)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        for ns in self.netns:  # deleting a namespace also removes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
