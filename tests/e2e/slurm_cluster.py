"""A real one-machine Slurm cluster for the tests: Debian's ``slurm-wlm`` and ``munge`` started as plain
background daemons (no systemd) in a private temp folder, on free ports, with their own munge key and
socket, so nothing outside the folder is touched and several clusters can coexist. See
megamlm/ARCHITECTURE.md ("Environment facts") for the settings that work and the ones that do not.

``SlurmCluster.start()`` returns a running cluster or raises :class:`SlurmUnavailable` with the reason
(not root, not installed, a daemon that does not come up); the pytest fixture turns that into a skip
that says why. ``stop()`` ends the three daemons by pid and removes the folder.

Run it by hand to poke at a cluster: ``python -m tests.e2e.slurm_cluster`` starts one, prints the
``SLURM_CONF`` to export and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE_CPUS = 2


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (the tests skip with it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_name() -> str:
    """The host's short name when it resolves (jobs then see a real host in SLURM_JOB_NODELIST, as on a
    cluster), else localhost."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        return "localhost"


class SlurmCluster:
    def __init__(self, cpus: int = NODE_CPUS):
        self.cpus = cpus
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = _node_name()
        self.partition = "debug"

    # ------------------------------------------------------------------ layout (TwoNodeSlurmCluster overrides)
    def node_names(self) -> list[str]:
        return [self.node]

    def controller_addr(self) -> str:
        return "127.0.0.1"

    def wrap(self, where: str, cmd: list[str]) -> list[str]:
        """``cmd`` as run on ``where`` (the controller or a node): here, this machine as it is."""
        return cmd

    def _conf_nodes(self) -> str:
        return (f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN\n"
                f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP "
                "OverSubscribe=NO\n")

    # ------------------------------------------------------------------ environment for clients
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.dir / "slurm.conf")
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    # ------------------------------------------------------------------ start / stop
    @staticmethod
    def why_not() -> str:
        if os.geteuid() != 0:
            return "not root: the one-machine Slurm cluster needs root (SlurmUser=root, munged as munge)"
        missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "setpriv")
                   if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            return (f"Slurm is not installed (missing {', '.join(missing)}); tools/setup.sh installs slurm-wlm and "
                    "munge with apt-get where it runs as root")
        try:
            pwd.getpwnam("munge")
        except KeyError:
            return "no 'munge' user (the munge package creates it)"
        return ""

    def start(self, timeout: float = 30) -> "SlurmCluster":
        why = self.why_not()
        if why:
            raise SlurmUnavailable(why)
        self.dir = Path(tempfile.mkdtemp(prefix="megamlm-slurm-"))
        try:
            self._start(timeout)
        except Exception:  # noqa: BLE001 - any failure to start means "no Slurm here": the tests skip
            logs = self.logs()
            self.stop()
            raise SlurmUnavailable(f"the Slurm daemons did not come up:\n{logs}") from None
        return self

    def _start(self, timeout: float) -> None:
        d = self.dir
        d.chmod(0o755)  # munged (as munge) must reach its folder inside
        mu = pwd.getpwnam("munge")
        md = d / "munge"
        md.mkdir()
        md.chmod(0o755)  # munged wants its socket folder reachable by all
        os.chown(md, mu.pw_uid, mu.pw_gid)
        key = md / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, mu.pw_uid, mu.pw_gid)
        key.chmod(0o400)
        self.munge_socket = md / "munge.socket"
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir()
        for n in self.node_names():
            (d / "spool" / n).mkdir()
        ctl_port, d_port = _free_port(), _free_port()
        (d / "slurm.conf").write_text(f"""\
# written by tests/e2e/slurm_cluster.py: a one-machine cluster for the tests
ClusterName=megamlm-test
SlurmctldHost={self.node}({self.controller_addr()})
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
{self._conf_nodes()}""")
        # munged as the munge user (setpriv execs, so the pid is munged's own)
        self._spawn("munged", ["setpriv", f"--reuid={mu.pw_uid}", f"--regid={mu.pw_gid}", "--init-groups",
                               "munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={md}/munged.pid", f"--log-file={md}/munged.log",
                               f"--seed-file={md}/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", self.wrap("ctl", ["slurmctld", "-D", "-i", "-f", str(d / "slurm.conf")]))
        for n in self.node_names():
            self._spawn(f"slurmd-{n}", self.wrap(n, ["slurmd", "-D", "-N", n, "-f", str(d / "slurm.conf")]))

        def idle() -> bool:
            r = self.run("sinfo", "-h", "-o", "%t", check=False, timeout=10)
            return r.returncode == 0 and r.stdout.strip() == "idle"

        self._wait(idle, timeout, "sinfo to report the node idle")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True)
        log.close()

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}")
            if ok():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")

    def logs(self, tail: int = 2000) -> str:
        if self.dir is None or not (self.dir / "log").is_dir():
            return ""
        out = []
        for f in sorted((self.dir / "log").iterdir()) + sorted((self.dir / "munge").glob("*.log")):
            try:
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
            except OSError:
                pass
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left, then end the daemons by pid (slurmd, slurmctld, munged) and remove the folder."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False, timeout=10)
        for name in reversed(list(self.procs)):  # slurmd(s), slurmctld, munged
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # ------------------------------------------------------------------ jobs
    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> int:
        """Submit; returns the job id."""
        r = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd, capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, jobid: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is gone."""
        r = self.run("scontrol", "show", "job", "-o", str(jobid), check=False, timeout=10)
        if r.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+(?::\w+)?)=(\S*)", r.stdout))

    def wait(self, jobid: int, timeout: float = 180, until=None) -> dict[str, str]:
        """Poll until the job ends (or ``until(info)`` is true); faster than ``sbatch --wait``."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(jobid)
            if until is not None and until(info):
                return info
            if until is None and info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {jobid} still {info.get('JobState')} after {timeout:.0f} s\n{self.logs()}")


class TwoNodeSlurmCluster(SlurmCluster):
    """Two slurmd "hosts" on this machine, each in its own network namespace with its own address, and
    slurmctld in a third that holds a bridge between them: ``10.213.N.1`` (controller), ``.2`` (node mm1),
    ``.3`` (node mm2), each host's interface named ``eth0``. Only namespaces and links this cluster
    creates are touched (removed by :meth:`stop`); the host's own network is not. Names resolve through a
    private hosts file bind-mounted over /etc/hosts in each daemon's (and client's) own mount namespace.
    Client commands (``run``, ``sbatch``) run in the controller's namespace; jobs run in their node's."""

    NODES = ("mm1", "mm2")

    def node_names(self) -> list[str]:
        return list(self.NODES)

    def controller_addr(self) -> str:
        return self.addr["ctl"]

    def __init__(self, cpus: int = 1):
        super().__init__(cpus)
        tag = f"{os.getpid() % 100000}"
        self.ns = {"ctl": f"mmc{tag}", "mm1": f"mm1x{tag}", "mm2": f"mm2x{tag}"}
        self.net = f"10.213.{os.getpid() % 250 + 1}"
        self.addr = {"ctl": f"{self.net}.1", "mm1": f"{self.net}.2", "mm2": f"{self.net}.3"}

    @staticmethod
    def why_not() -> str:
        why = SlurmCluster.why_not()
        if why:
            return why
        missing = [b for b in ("ip", "nsenter", "unshare") if shutil.which(b) is None]
        if missing:
            return f"{', '.join(missing)} missing (iproute2 / util-linux): no network namespaces for two hosts"
        probe = f"mmprobe{os.getpid() % 100000}"
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return "" if r.returncode == 0 else f"cannot create a network namespace: {r.stderr.strip()}"

    def wrap(self, where: str, cmd: list[str]) -> list[str]:
        """``cmd`` inside namespace ``where`` (ctl, mm1, mm2), with this cluster's hosts file as /etc/hosts."""
        return ["nsenter", f"--net=/run/netns/{self.ns[where]}", "unshare", "--mount", "--propagation", "private",
                "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(self.dir / "hosts"), *cmd]

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(self.wrap("ctl", list(args)), env=self.env(), capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> int:
        r = subprocess.run(self.wrap("ctl", ["sbatch", "--parsable", *args]), env=self.env(env), cwd=cwd,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def _network(self) -> None:
        ip = ["ip"]
        ctl = self.ns["ctl"]
        for ns in self.ns.values():
            subprocess.run(ip + ["netns", "add", ns], check=True, capture_output=True)
        steps = [["-n", ctl, "link", "add", "br0", "type", "bridge"], ["-n", ctl, "link", "set", "br0", "up"],
                 ["-n", ctl, "addr", "add", f"{self.addr['ctl']}/24", "dev", "br0"], ["-n", ctl, "link", "set", "lo", "up"]]
        for i, node in enumerate(self.NODES, 1):
            peer = f"v{i}x{os.getpid() % 100000}"
            steps += [["link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", self.ns[node]],
                      ["link", "set", peer, "netns", ctl], ["-n", ctl, "link", "set", peer, "master", "br0"],
                      ["-n", ctl, "link", "set", peer, "up"],
                      ["-n", self.ns[node], "addr", "add", f"{self.addr[node]}/24", "dev", "eth0"],
                      ["-n", self.ns[node], "link", "set", "eth0", "up"], ["-n", self.ns[node], "link", "set", "lo", "up"]]
        for st in steps:
            subprocess.run(ip + st, check=True, capture_output=True, text=True)
        host = socket.gethostname().split(".")[0]
        (self.dir / "hosts").write_text(f"127.0.0.1 localhost\n{self.addr['ctl']} {host}\n"
                                        + "".join(f"{self.addr[n]} {n}\n" for n in self.NODES))

    def _start(self, timeout: float) -> None:
        self._network()
        super()._start(timeout)

    def _conf_nodes(self) -> str:
        return "".join(f"NodeName={n} NodeAddr={self.addr[n]} CPUs={self.cpus} State=UNKNOWN\n" for n in self.NODES) + \
            f"PartitionName={self.partition} Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP " \
            "OverSubscribe=NO\n"

    def stop(self) -> None:
        super_dir = self.dir
        super().stop()
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if super_dir is not None:
            shutil.rmtree(super_dir, ignore_errors=True)


try:
    import pytest
except ImportError:  # pragma: no cover - the manual helper below needs no pytest
    pytest = None

if pytest is not None:
    def running(cls):
        """A started ``cls`` cluster for a fixture (yielded, stopped after); a skip that says why where
        Slurm (or, for two nodes, network namespaces) cannot run."""
        why = cls.why_not()
        if why:
            pytest.skip(why)
        try:
            cluster = cls().start()
        except SlurmUnavailable as e:
            pytest.skip(str(e))
        try:
            yield cluster
        finally:
            cluster.stop()

    @pytest.fixture(scope="session")
    def slurm_cluster():
        """One cluster for the whole session."""
        yield from running(SlurmCluster)

    @pytest.fixture(scope="module")
    def two_node_cluster():
        """Two slurmd hosts (TwoNodeSlurmCluster), for one test module."""
        yield from running(TwoNodeSlurmCluster)


if __name__ == "__main__":  # pragma: no cover - a manual helper
    def _quit(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _quit)
    signal.signal(signal.SIGINT, _quit)  # a background job starts with SIGINT ignored
    c = SlurmCluster().start()
    print(f"export SLURM_CONF={c.dir}/slurm.conf   # Ctrl-C (or SIGTERM) stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
