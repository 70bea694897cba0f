"""The README is a front door: short, opening with the two commands, naming only paths that
exist, and its cheap commands run exactly as printed."""

import re
import shlex
import subprocess

import pytest

from tests.train_helpers import ROOT

README = ROOT / "README.md"
BUDGET_BYTES = 15_000  # the READMEs of Megatron-LM, OLMo-core, torchtitan and nanoGPT: 9-14 KB
TWO_COMMANDS = ["bash examples/quickstart.sh", "bash tests/run.sh"]


def readme() -> str:
    return README.read_text()


def test_readme_stays_within_its_budget():
    size = len(readme().encode())
    assert size <= BUDGET_BYTES, f"README.md is {size} bytes, over {BUDGET_BYTES}: move detail to docs/"


def test_readme_opens_with_the_two_commands():
    first_block = re.match(r"```bash\n(.*?)```", readme(), re.S)
    assert first_block, "README.md must open with a bash block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == TWO_COMMANDS


def named_paths(text: str) -> set:
    """Repository paths in markdown links and in inline code (`examples/...`, `docs/x.md`, ...);
    fenced commands are left out (they name outputs too, which need not exist yet)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose)
    ticked = [w for span in re.findall(r"`([^`]+)`", prose) for w in span.split()]
    roots = ("docs/", "examples/", "tools/", "tests/", "benchmarks/", "studies/", "megatron_patch/", "docker/",
             "results/")
    out = set()
    for word in links + ticked:
        word = word.strip(",.;:()'\"")
        if word.startswith(roots) and not any(c in word for c in "*{}<>$"):
            out.add(word.split("::")[0])
    return out


@pytest.mark.parametrize("page", ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
def test_every_path_a_page_names_exists(page):
    path = ROOT / page
    base = path.parent
    missing = []
    for name in sorted(named_paths(path.read_text())):
        if not ((ROOT / name).exists() or (base / name).exists()):
            missing.append(name)
    assert not missing, f"{page} names paths that do not exist: {missing}"


def cheap_readme_commands() -> list:
    """The README's commands that need neither data nor a GPU: help and dry runs."""
    blocks = re.findall(r"```bash\n(.*?)```", readme(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #")[0].strip()
            if "--dry-run" in command or command.endswith("--help"):
                commands.append(command)
    return commands


def test_the_readme_names_cheap_commands_to_run():
    assert any("--dry-run" in c for c in cheap_readme_commands())


@pytest.mark.slow
@pytest.mark.parametrize("command", cheap_readme_commands())
def test_cheap_readme_command_runs_as_written(command):
    """Run with the environment the README's first command leaves (.venv, found by the scripts)."""
    assert (ROOT / ".venv/bin/python").exists() or pytest.skip("no .venv: run the README's first command")
    r = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{shlex.quote(command)} failed:\n{r.stderr[-2000:]}"
