"""The two sides of `balloon-lab ab`: checkouts of the lab that trials run in.

A side is named by a git revision of this repository (checked out with `git worktree
add --detach` into a temporary directory, removed afterwards) or by the path of
another checkout; the candidate defaults to the working tree the lab runs from. Each
side's trials run that side's lab, device and guest code (PYTHONPATH and cwd = its
checkout) with one interpreter, the one running `ab`, so the only difference between
the sides is their code.

Sides are spoken to only through `balloon-lab run ... --json`, with options every
revision since 59e0f30 has; what a side can do beyond that (`--cycles`) is read from
its own `run --help`, so an old base still runs, one cycle per trial.

A name that is neither a checkout nor a commit here (a shallow clone lacks old
commits) is a SideError: exit 2, with the command that fetches it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lab.gate.ab.pinning import pinned_program
from lab.paths import REPO_ROOT

# How a side's `balloon-lab` is started: its own lab.cli under this interpreter (a
# checkout need not be installed; `-c` keeps the checkout, the cwd, first on sys.path).
CLI = "import sys; sys.argv[0] = 'balloon-lab'; from lab.cli import main; main()"
SOURCE_DIRS = ("lab", "device", "workloads", "probes", "reports", "fuzz")


class SideError(Exception):
    """A side that cannot be prepared (exit 2); the message says what to do."""


@dataclass
class Side:
    """One checkout trials run in."""

    label: str                  # base | candidate
    ref: str                    # what the user named
    path: Path                  # the checkout
    commit: str | None          # HEAD of the checkout, if it is a git checkout
    dirty: bool = False         # uncommitted changes in a working tree
    temporary: bool = False     # a worktree ab added (and removes)
    options: frozenset[str] = field(default_factory=frozenset)   # `run` options this side has

    @property
    def paced(self) -> bool:
        """True if the side's `run` repeats inflate/deflate cycles in one pair of
        processes, each started by a line on stdin (`--cycles K --paced`)."""
        return {"--cycles", "--paced"} <= self.options

    @property
    def retouch_apart(self) -> bool:
        """True if the side's paced `run` can give memory back between cycles in a step of
        its own (`--pace-retouch`), so both sides do it at once, outside the turns."""
        return self.paced and "--pace-retouch" in self.options

    def command(self, *args: str, cpu: int | None = None) -> list[str]:
        """`balloon-lab ARGS` with this side's code (its path on PYTHONPATH: env()), on
        `cpu` only if given (lab/gate/ab/pinning.py)."""
        return [sys.executable, "-c", pinned_program(CLI, cpu), *args]

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.path))

    def describe(self) -> str:
        what = self.commit[:12] if self.commit else "?"
        return (f"{self.ref} ({what}{' + uncommitted changes' if self.dirty else ''}"
                f"{', worktree ' + str(self.path) if self.temporary else ', ' + str(self.path)})")

    def to_dict(self) -> dict:
        return {"label": self.label, "ref": self.ref, "path": str(self.path), "commit": self.commit,
                "dirty": self.dirty, "paced": self.paced,
                "retouch_apart": self.retouch_apart}


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise SideError(f"git {' '.join(args)} in {repo}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def is_checkout(path: Path) -> bool:
    """A balloon-lab checkout: its `lab.cli` (a module before lab/ had rooms, a package
    since) and its device."""
    cli = path / "lab" / "cli"
    return (cli.with_suffix(".py").is_file() or (cli / "__init__.py").is_file()) and (path / "device").is_dir()


def resolve_commit(repo: Path, rev: str) -> str:
    """The full sha of `rev` in `repo`, or a SideError that says how to get it."""
    p = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if p.returncode == 0:
        return p.stdout.strip()
    shallow = _git(repo, "rev-parse", "--is-shallow-repository", check=False).stdout.strip() == "true"
    hint = (" This clone is shallow: fetch the history (git fetch --unshallow) or that commit "
            f"(git fetch origin {rev})." if shallow else
            f" Fetch it first (git fetch origin {rev}), or name a path to a checkout.")
    raise SideError(f"{rev!r} is neither a checkout directory nor a commit in {repo}.{hint}")


def prepare_side(label: str, ref: str | None, repo: Path, workdir: Path) -> Side:
    """A Side for `ref`: None = the working tree at `repo`, a directory = that checkout,
    else a git revision of `repo` checked out into `workdir` (detached worktree)."""
    if ref is None:
        path = repo
    elif Path(ref).is_dir():
        path = Path(ref).resolve()
    else:
        path = None
    if path is not None:
        if not is_checkout(path):
            raise SideError(f"{label}: {path} is not a balloon-lab checkout (no lab.cli, no device/)")
        commit, dirty = None, False
        head = _git(path, "rev-parse", "HEAD", check=False)
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = bool(_git(path, "status", "--porcelain", "--untracked-files=no", check=False).stdout.strip())
        return _with_options(Side(label, ref or "working tree", path, commit, dirty))
    sha = resolve_commit(repo, ref)
    dest = workdir / f"{label}-{sha[:12]}"
    _git(repo, "worktree", "add", "--detach", str(dest), sha)
    side = Side(label, ref, dest, sha, temporary=True)
    if not is_checkout(dest):
        remove_side(side, repo)
        raise SideError(f"{label}: revision {ref} ({sha[:12]}) has no lab.cli or device/: not a balloon-lab "
                        "revision")
    return _with_options(side)


def _with_options(side: Side) -> Side:
    """Compile the side's code once (so no trial pays for it, nor writes .pyc files
    while timed) and read which `run` options it has from its own help."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", *[d for d in SOURCE_DIRS if (side.path / d).is_dir()]],
                   cwd=side.path, env=side.env(), capture_output=True)
    p = subprocess.run(side.command("run", "--help"), cwd=side.path, env=side.env(), capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0:
        raise SideError(f"{side.label} {side.ref}: `balloon-lab run --help` failed there:\n{p.stderr[-1500:]}")
    side.options = frozenset(w.strip("[],") for w in p.stdout.split() if w.startswith("--"))
    missing = {"--json", "--protocol", "--guest-mib", "--inflate-mib", "--seed", "--workload"} - side.options
    if missing:
        raise SideError(f"{side.label} {side.ref}: its `run` lacks {', '.join(sorted(missing))}")
    return side


def remove_side(side: Side, repo: Path) -> None:
    """Remove a worktree ab added (never a checkout the user named)."""
    if not side.temporary:
        return
    p = _git(repo, "worktree", "remove", "--force", str(side.path), check=False)
    if p.returncode != 0:
        shutil.rmtree(side.path, ignore_errors=True)
        _git(repo, "worktree", "prune", check=False)


def workdir() -> Path:
    """A fresh temporary directory for the worktrees."""
    return Path(tempfile.mkdtemp(prefix="balloon-lab-ab-"))
