"""Two hosts on one machine: network namespaces joined by a veth pair, each "node" with its own
hostname (UTS namespace), /etc/hosts, mounts and process tree.

    node1 = 10.200.0.1, node2 = 10.200.0.2, interface `hsn0` on both (lo is up too)

A command runs on a node as
    nsenter --net=/run/netns/NS unshare --uts --mount --pid --fork --kill-child --mount-proc \
        sh -c 'hostname nodeN; mount --bind HOSTS /etc/hosts; [mount --bind SRC DST ...]; exec CMD'
`nsenter --net` rather than `ip netns exec`: the latter remounts /sys, and slurmd then fails on
cgroups. The private PID namespace makes clean-up certain: killing the unshare process kills
everything the command started (SIGKILL to the namespace's init). The bind mounts give a node a
directory of its own at a shared path: storage the nodes do not share.

Needs root, `ip` (iproute2), nsenter and unshare (util-linux); `why_unavailable()` says which is
missing. Namespace names carry the pid (or MULTIHOST_TAG), so parallel sessions on one machine
do not collide; every process started here lives in one of the two network namespaces, so
`ip netns pids NAME` finds whatever a killed session left behind.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ADDRS = ("10.200.0.1", "10.200.0.2")
NAMES = ("node1", "node2")
IFNAME = "hsn0"


def why_unavailable():
    """None when two hosts can be made here, else the reason (one line)."""
    if not os.path.isdir("/proc/self/ns") or os.name != "posix":
        return "two-host tests need Linux namespaces"
    missing = [c for c in ("ip", "nsenter", "unshare") if shutil.which(c) is None]
    if missing:
        return f"two-host tests need {', '.join(missing)} (iproute2, util-linux)"
    if os.geteuid() != 0:
        return "two-host tests need root (network namespaces, mounts)"
    probe = f"mpprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class TwoHosts:
    """with TwoHosts(workdir) as hosts: hosts.start(0, argv, log) ... (everything stopped on exit)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        # MULTIHOST_TAG lets a caller (the CI lane) find and remove what a killed session left.
        tag = os.environ.get("MULTIHOST_TAG") or f"mp{os.getpid() % 100000}"
        self.netns = (f"{tag}n1", f"{tag}n2")
        self._veth = (f"{tag}a", f"{tag}b")
        self.hosts_file = self.workdir / "hosts"
        self.procs = []

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()

    def up(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.down()  # left by an earlier, killed session of this pid (unlikely)
        for ns in self.netns:
            _ip("netns", "add", ns)
        _ip("link", "add", self._veth[0], "type", "veth", "peer", "name", self._veth[1])
        for ns, veth, addr in zip(self.netns, self._veth, ADDRS):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "link", "set", veth, "name", IFNAME)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # The IPv4-mapped IPv6 forms too: torch's TCPStore listens dual-stack and looks its peers'
        # addresses up in reverse in that form; without an answer every run warns "[c10d] The
        # hostname of the client socket cannot be retrieved" (see the README's multi-node section).
        self.hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{a} {n}\n::ffff:{a} {n}\n" for a, n in zip(ADDRS, NAMES)))

    def command(self, node: int, argv, binds=()):
        """argv wrapped to run on node 0 or 1; binds: (source, target) directories mounted there only."""
        mounts = "".join(f' && mount --bind "{src}" "{dst}"' for src, dst in binds)
        script = f'hostname {NAMES[node]} && mount --bind "{self.hosts_file}" /etc/hosts{mounts} && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns[node]}", "unshare", "--uts", "--mount",
                "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc",
                "sh", "-c", script, "sh", *map(str, argv)]

    def start(self, node: int, argv, log: Path, env=None, binds=(), cwd=None) -> subprocess.Popen:
        """Start argv on the node, stdout and stderr to `log`; stopped by down()."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(node, argv, binds), stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, node: int, argv, env=None, timeout=60, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(node, argv), env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    def trainer_pid(self, proc: subprocess.Popen) -> int:
        """The pid (seen from here) of what `start` exec'd: the namespace's first process."""
        for _ in range(100):
            try:
                kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.1)
        raise RuntimeError(f"process {proc.pid} has no child")

    def kill(self, proc: subprocess.Popen, sig: str = "TERM"):
        """Send a signal to what `start` exec'd on a node (e.g. the trainer: SIGTERM saves and exits)."""
        os.kill(self.trainer_pid(proc), getattr(signal, f"SIG{sig}"))

    def link(self, node: int, up: bool):
        """Take a node's network link down (the node vanishes for the other one) or up again."""
        _ip("-n", self.netns[node], "link", "set", IFNAME, "up" if up else "down")

    def mount_private(self, proc: subprocess.Popen, source: Path, target: Path):
        """Mount `source` over `target` inside a running node's mount namespace (storage that stops
        being shared mid-run)."""
        subprocess.run(["nsenter", f"--target={proc.pid}", "--mount", "mount", "--bind", str(source), str(target)],
                       check=True, capture_output=True, text=True)

    def down(self):
        """Stop everything started (each node's whole PID namespace), then remove the namespaces
        (which removes the veth pair)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # unshare --kill-child: the namespace dies with it
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        self.procs.clear()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
