"""The Docker images cannot drift from `make setup`, and their commands only use entry points this repo has.

No Docker engine is needed: both Dockerfiles are parsed as text. The CPU image must install through `make setup`
itself; the CUDA image repeats the Makefile's pip installs (same order, same pins, `fbgemm-gpu` for
`fbgemm-gpu-cpu`), and every RUN/CMD command is either a known system tool or a Makefile target / repo module.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]
# System programs the images may call besides the repo's own entry points.
SYSTEM_PROGRAMS = {"apt-get", "add-apt-repository", "rm", "bash"}
# `python -m X` for these is a tool, not a repo module.
TOOL_MODULES = {"venv", "pip"}
# Command substitutions the CMDs may use, and what to read them as when checking the command line.
SUBSTITUTIONS = {"nvidia-smi -L | wc -l": "1"}
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile: comment lines dropped, backslash continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def script_of(instr: Instruction) -> str:
    """The shell text of a RUN or CMD (exec form `["bash", "-c", S]` gives S, other exec forms their argv)."""
    if instr.args.startswith("["):
        argv = json.loads(instr.args)
        if argv[:1] in (["bash"], ["sh"], ["/bin/sh"], ["/bin/bash"]) and argv[1:2] == ["-c"]:
            return str(argv[2])
        return shlex.join(argv)
    return instr.args


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line, split at `&&`, `||`, `;` and `|`; known `$(...)` substituted."""
    for sub in re.findall(r"\$\(([^)]*)\)", script):
        assert sub in SUBSTITUTIONS, f"unexpected command substitution $({sub})"
        script = script.replace(f"$({sub})", SUBSTITUTIONS[sub])
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            out.append([])
        else:
            out[-1].append(token)
    assert all(out), f"empty command in {script!r}"
    return out


def image_commands(name: str, keywords: tuple[str, ...] = ("RUN", "CMD")) -> list[list[str]]:
    return [cmd for i in parse_dockerfile(DOCKER / name) if i.keyword in keywords for cmd in commands(script_of(i))]


def makefile_vars() -> dict[str, str]:
    text = (REPO / "Makefile").read_text()
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", text, re.M)}


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m[1] for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M)}


def makefile_pip_installs() -> list[list[str]]:
    """The `pip install` argument lists of the Makefile's install recipe, variables expanded."""
    variables = makefile_vars()
    text = (REPO / "Makefile").read_text()
    out = []
    for line in re.findall(r"^\t\$\(BIN\)/pip install (.*)$", text, re.M):
        expanded = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables[m[1]], line)
        out.append(shlex.split(expanded))
    return out


def pins(requirements: list[str]) -> dict[str, str]:
    return dict(r.split("==", 1) for r in requirements if "==" in r)


def repo_module(module: str) -> Path:
    """The file of a `python -m` module of this repo; it must exist and have a `__main__` guard."""
    path = REPO / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"`-m {module}`: no {path.relative_to(REPO)} in the repo"
    assert 'if __name__ == "__main__":' in path.read_text(), f"`-m {module}` has no __main__ guard"
    return path


def test_cpu_image_is_make_setup_then_make_test() -> None:
    instrs = parse_dockerfile(DOCKER / "Dockerfile.cpu")
    assert instrs[0] == Instruction("FROM", "python:3.11-slim")
    assert makefile_vars()["PY"] == "python3.11"
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"] == ">=3.11,<3.12"
    envs = " ".join(i.args for i in instrs if i.keyword == "ENV").split()
    assert "PIP_NO_CACHE_DIR=1" in envs
    cmds = image_commands("Dockerfile.cpu", ("RUN",))
    assert ["make", "setup"] in cmds
    assert {"make", "git"} <= set(next(c for c in cmds if c[:2] == ["apt-get", "install"]))
    # No pip of its own: every pin comes from the Makefile, so there is nothing to drift.
    assert not [c for c in cmds if c[0] == "pip" or "pip" in c[1:3]], "the CPU image must install via `make setup`"
    assert not re.search(r"(torch|fbgemm|torchrec|torchmetrics)\S*==", " ".join(i.args for i in instrs))
    assert image_commands("Dockerfile.cpu", ("CMD",)) == [["make", "test"]]


def test_cuda_image_repeats_the_makefile_installs() -> None:
    instrs = parse_dockerfile(DOCKER / "Dockerfile.cuda")
    assert instrs[0].keyword == "FROM" and instrs[0].args.startswith("nvidia/cuda:")
    assert "PIP_NO_CACHE_DIR=1" in " ".join(i.args for i in instrs if i.keyword == "ENV").split()
    docker = [c[2:] for c in image_commands("Dockerfile.cuda", ("RUN",)) if c[:2] == ["pip", "install"]]
    make = makefile_pip_installs()
    assert make[0] == ["--upgrade", "pip"] and make[-1][:2] == ["-e", ".[dev]"]
    # The stack, in the Makefile's order, with the CUDA fbgemm in place of the CPU one.
    expected = [[a.replace("fbgemm-gpu-cpu==", "fbgemm-gpu==") for a in args] for args in make[1:-1]]
    assert docker[:-1] == expected
    # Then the project itself, holding torch at the same pin.
    assert docker[-1] == [".", makefile_vars()["TORCH"]]
    variables = makefile_vars()
    make_pins = pins([variables[v] for v in ("TORCH", "FBGEMM", "TORCHREC")] + variables["TORCHREC_DEPS"].split())
    docker_pins = pins([a for args in docker for a in args])
    for name in ("torch", "torchrec", "torchmetrics"):
        assert docker_pins[name] == make_pins[name], name
    assert docker_pins["fbgemm-gpu"] == make_pins["fbgemm-gpu-cpu"]
    assert "fbgemm-gpu-cpu" not in docker_pins


@pytest.mark.parametrize("name", DOCKERFILES)
def test_commands_use_only_repo_entry_points(name: str) -> None:
    targets = makefile_targets()
    for cmd in image_commands(name):
        prog, args = cmd[0], cmd[1:]
        if prog == "make":
            assert args and set(args) <= targets, f"{name}: `make {' '.join(args)}`: not a Makefile target"
        elif prog in ("python", "python3.11"):
            assert args[0] == "-m", f"{name}: {cmd}"
            if args[1] not in TOOL_MODULES:
                repo_module(args[1])
        elif prog == "torchrun":
            module = args[args.index("-m") + 1]
            repo_module(module)
            if "--config" in args:
                assert (REPO / args[args.index("--config") + 1]).is_file()
        elif prog == "pip":
            assert args[0] == "install", f"{name}: {cmd}"
        else:
            assert prog in SYSTEM_PROGRAMS, f"{name}: `{prog}` is neither a system tool nor a repo entry point"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_keeps_host_state_out(name: str) -> None:
    # A copied host .venv would bring make's `.installed` stamp along and skip `make setup`.
    lines = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert {".venv", "runs", "data"} <= set(lines)


def _smoke() -> tuple[list[str], list[str]]:
    cmds = image_commands("Dockerfile.cuda", ("CMD",))
    assert [c[0] for c in cmds] == ["python", "torchrun"]
    return cmds[0], cmds[1]


def test_cuda_smoke_synthetic_step_runs(tmp_path: Path) -> None:
    from pipeline.synthetic import main

    synthetic, train = _smoke()
    assert synthetic[:3] == ["python", "-m", "pipeline.synthetic"]
    args = synthetic[3:]
    out = args[args.index("--out") + 1]
    # The training step reads what this step writes.
    assert f"data.path={out}" in train
    args[args.index("--out") + 1] = str(tmp_path / "s")
    main(args)
    assert len(list((tmp_path / "s").glob("day=*"))) == int(args[args.index("--days") + 1])


def test_cuda_smoke_train_step_parses() -> None:
    from torch.distributed.run import get_args_parser

    from jobs.config import load_config

    _, train = _smoke()
    launch = get_args_parser().parse_args(train[1:])
    assert launch.standalone and launch.module and launch.training_script == "jobs.train"
    job_args = launch.training_script_args
    flags = set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', (REPO / "jobs" / "train.py").read_text()))
    assert {a for a in job_args if a.startswith("--")} <= flags
    config = job_args[job_args.index("--config") + 1]
    overrides = [a for a in job_args[job_args.index("--config") + 2 :] if not a.startswith("--")]
    cfg = load_config(REPO / config, overrides)
    assert cfg.train.device == "cuda"
