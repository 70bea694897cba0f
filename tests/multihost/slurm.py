"""A two-node Slurm on the two hosts of hosts.py: munged, slurmctld and a slurmd on node1, a
slurmd on node2. The nodes share node1's munged (its socket is a file, which network namespaces
do not hide; a real cluster runs one munged per node with one key). Every daemon runs in the
foreground under TwoHosts, so TwoHosts.down() stops it.
Needs Debian's slurmctld, slurmd, slurm-client and munge (tests/slurm/install.sh)."""

import os
import shutil
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def why_no_slurm():
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]
    return f"{', '.join(missing)} not installed (run: bash tests/slurm/install.sh)" if missing else None


class TwoNodeSlurm:
    def __init__(self, hosts, state: Path):
        self.hosts, self.state = hosts, Path(state)
        self.conf = self.state / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout=60):
        state = self.state
        for d in ("ctld", "slurmd-node1", "slurmd-node2"):
            (state / d).mkdir(parents=True, exist_ok=True)
        state.chmod(0o700)
        (state / "plugstack.conf").write_text("")
        self.conf.write_text((HERE / "slurm.conf.in").read_text().replace("@STATE@", str(state)))
        key = state / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.hosts.start(0, ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={state}/munge.socket", f"--pid-file={state}/munged.pid",
                               f"--log-file={state}/munged.log", f"--seed-file={state}/munged.seed"],
                              state / "munged.out")
        self.hosts.start(0, ["slurmctld", "-D", "-f", self.conf], state / "slurmctld.out", env=self.env)
        for node in (0, 1):
            self.hosts.start(node, ["slurmd", "-D", "-f", self.conf, "-N", f"node{node + 1}"],
                             state / f"slurmd-node{node + 1}.out", env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.cmd("sinfo", "-h", "-o", "%n %T", check=False)
            if sorted(r.stdout.split()) == ["idle", "idle", "node1", "node2"]:
                return
            time.sleep(1)
        logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                       for p in sorted(state.glob("*.log")) + sorted(state.glob("*.out")))
        raise RuntimeError(f"the two slurmd's did not become idle: {r.stdout} {r.stderr}{logs}")

    def cmd(self, *argv, check=True, cwd=None, env=None) -> subprocess.CompletedProcess:
        """A Slurm client command, run on node1 (where slurmctld listens)."""
        r = self.hosts.run(0, list(argv), env=dict(self.env, **(env or {})), cwd=cwd, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))}: {r.stderr.strip()}")
        return r

    def job_state(self, job) -> str:
        r = self.cmd("scontrol", "show", "job", job, check=False)
        for field in r.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "GONE"
