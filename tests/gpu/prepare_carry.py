"""Prepare the GPU check for the lent GPU machine (no network there; only the work tree and named
carry folders travel): download the cp312 wheels the check needs and that machine lacks into
.gpu_carry/ (ignored by git), check them against the machine's package list, and print the one
command to run there. Run here, on any machine that reaches the package index:

    python3 tests/gpu/prepare_carry.py            # prints the command on stdout, notes on stderr
    python3 tests/gpu/prepare_carry.py --check    # the same without downloading (wheels already there)
    python3 tests/gpu/prepare_carry.py --print    # only print the command

The machine's packages are tests/gpu/machine_packages.txt. megatron-core is the newest that
setup.py's requirement admits for Python 3.12 (pip picks it), so the version lives in setup.py
alone. It needs only a Python with pip.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip's own copy, so that any Python with pip runs this. Not first: importing
    # pip turns off setuptools' distutils shim, and a later `import setuptools` (torch's
    # cpp_extension, which megatron-core imports) then fails in the same process.
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CARRY = ".gpu_carry"  # relative to the repository root, as the command names it; in .gitignore
MACHINE_PACKAGES = ROOT / "tests" / "gpu" / "machine_packages.txt"
# The lent machine's limits: 64 MiB of work tree and carry per call, 2,000 characters of command.
CARRY_LIMIT_MIB = 64
COMMAND_LIMIT = 2000
# Carried besides megatron-core: pytest (the gpu-marked tests) and pytest-timeout (pytest.ini's
# `timeout`), pinned to what the rehearsal runs them with.
EXTRA_WHEELS = ("pytest==9.2.0", "pytest-timeout==2.4.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Where the wheels are installed there (pip --target); GPU_CHECK_SITE moves it (the rehearsal).
SITE = "${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
# The lent machine, for environment markers (extra="" leaves optional extras out).
MACHINE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
                   "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def megatron_core_requirement(setup_py: Path = ROOT / "setup.py") -> str:
    """setup.py's megatron-core requirement, e.g. 'megatron-core==0.16.1'."""
    found = re.search(r"""["'](megatron[-_]core\s*[<>=!~][^"']*)["']""", setup_py.read_text())
    if not found:
        raise SystemExit(f"prepare_carry: no megatron-core requirement found in {setup_py}")
    return re.sub(r"\s+", "", found.group(1))


def machine_packages(path: Path = MACHINE_PACKAGES) -> dict:
    """{canonical name: requirement line} of the lent machine's packages."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {canonical(re.split(r"[<>=!~ ;\[]", line)[0]): line for line in lines if line}


def wheel_metadata(wheel: Path) -> tuple:
    """(canonical name, version, [names it requires on the lent machine]) from a wheel's METADATA:
    Requires-Dist lines whose markers hold for CPython 3.12 on Linux x86-64, extras left out."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    header = text.split("\n\n")[0]
    name = re.search(r"^Name: (.+)$", header, re.M).group(1).strip()
    version = re.search(r"^Version: (.+)$", header, re.M).group(1).strip()
    requires = [Requirement(line) for line in re.findall(r"^Requires-Dist: (.+)$", header, re.M)]
    needed = [canonical(r.name) for r in requires if r.marker is None or r.marker.evaluate(MACHINE_MARKERS)]
    return canonical(name), version, needed


def check_carry(wheels, machine: dict, requirements=()) -> list:
    """Problems (one line each) with carrying `wheels` to a machine holding `machine`: a wheel the
    machine already has, two versions of one package, a dependency neither there nor carried, a
    requirement no wheel satisfies (e.g. a carry folder older than setup.py's range)."""
    problems, carried = [], {}
    for wheel in wheels:
        name, version, requires = wheel_metadata(wheel)
        if name in machine:
            problems.append(f"{wheel.name}: the machine already has {machine[name]}; carry none")
        if name in carried:
            problems.append(f"{wheel.name}: a second version of {name} (pip refuses two)")
        carried[name] = (version, requires)
    for name, (_, requires) in carried.items():
        missing = [r for r in requires if r not in machine and r not in carried]
        if missing:
            problems.append(f"{name} needs {', '.join(missing)}: neither on the machine nor carried")
    for line in requirements:
        req = Requirement(line)
        version = carried.get(canonical(req.name), (None,))[0]
        if version is None or not req.specifier.contains(version, prereleases=True):
            problems.append(f"{line}: not carried (found {version or 'none'}); run tests/gpu/prepare_carry.py")
    return problems


def command() -> str:
    """The one command to run on the lent machine, from the repository root, with $OUT set."""
    return (
        f"set -o pipefail; mkdir -p \"$OUT\"; site=\"{SITE}\"; rm -rf \"$site\"; "
        f"python3 -m pip install --no-index --no-deps --no-compile --target \"$site\" {CARRY}/*.whl "
        "> \"$OUT/install.log\" 2>&1 || { tail -5 \"$OUT/install.log\"; exit 2; }; "
        "PYTHONPATH=\"$site\" PYTHONUNBUFFERED=1 python3 tests/gpu/check.py \"$OUT\" 2>&1 | tee \"$OUT/console.log\""
    )


def download(dest: Path, requirements) -> None:
    """The cp312 manylinux wheels of `requirements`, without dependencies (checked separately)."""
    platforms = [f"--platform={p}" for p in PLATFORMS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(dest),
                    *requirements], check=True, stdout=sys.stderr)


def prepare(dest: Path, requirements) -> list:
    """Make `dest` hold exactly the wheels of `requirements` (pip's cache makes a repeat cheap)."""
    fresh = Path(tempfile.mkdtemp(prefix=".gpu_carry_", dir=dest.parent))
    try:
        download(fresh, requirements)
        shutil.rmtree(dest, ignore_errors=True)
        fresh.chmod(0o755)
        fresh.rename(dest)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return sorted(dest.glob("*.whl"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="Check the wheels already there; download nothing.")
    mode.add_argument("--print", action="store_true", help="Only print the command.")
    ap.add_argument("--megatron-core", default=None,
                    help="Requirement to carry instead of setup.py's (to try another version).")
    args = ap.parse_args(argv)
    if args.print:
        print(command())
        return 0
    requirements = [args.megatron_core or megatron_core_requirement(), *EXTRA_WHEELS]
    dest = ROOT / CARRY
    wheels = sorted(dest.glob("*.whl")) if args.check else prepare(dest, requirements)
    problems = check_carry(wheels, machine_packages(), requirements)
    size_mib = sum(w.stat().st_size for w in wheels) / 2**20
    tree_mib = _work_tree_mib()
    if size_mib + tree_mib > CARRY_LIMIT_MIB / 2:
        problems.append(f"{size_mib:.1f} MiB of wheels + {tree_mib:.1f} MiB of work tree: over half "
                        f"the {CARRY_LIMIT_MIB} MiB a call carries")
    if len(command()) > COMMAND_LIMIT:
        problems.append(f"the command is {len(command())} characters (limit {COMMAND_LIMIT})")
    for wheel in wheels:
        name, version, _ = wheel_metadata(wheel)
        print(f"carry: {name} {version} ({wheel.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    if problems:
        print("prepare_carry: " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"carry: {size_mib:.1f} MiB of wheels in {CARRY}/, work tree {tree_mib:.1f} MiB; on the lent "
          f"machine run (carry: [\"{CARRY}\"]), from the repository root:", file=sys.stderr)
    print(command())
    return 0


def _work_tree_mib() -> float:
    """What travels besides the carry folder: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode:
        return 0.0  # not a git checkout (an exported tree): nothing to measure
    paths = (ROOT / p for p in listed.stdout.split("\0") if p)
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


if __name__ == "__main__":
    sys.exit(main())
