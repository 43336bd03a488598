"""A private PostgreSQL server in a temporary directory, for tests and benchmarks.

initdb + pg_ctl from Debian's `postgresql` package, run as an unprivileged user
(PostgreSQL refuses to run as root: as root the server runs as the `postgres` system
user). It listens only on a unix socket inside its own directory, so it needs no port
and cannot collide with another server on the machine. stop() removes everything.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class LocalPostgresError(RuntimeError):
    """The server could not be set up; the message says what is missing."""


def bin_dir() -> Path:
    """The newest installed server's bin directory (initdb, pg_ctl)."""
    found = sorted(glob.glob(PG_BIN_GLOB), key=lambda p: [int(x) for x in Path(p).parent.name.split(".")
                                                         if x.isdigit()])
    found = [p for p in found if os.access(os.path.join(p, "initdb"), os.X_OK)]
    if not found:
        raise LocalPostgresError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: "
                                 "apt-get install postgresql")
    return Path(found[-1])


@dataclass
class LocalPostgres:
    """A running server: `url` connects to its `postgres` database as user postgres."""

    root: Path
    url: str
    _run_as: tuple[int, int] | None

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run([str(bin_dir() / args[0]), *args[1:]], self._run_as, check=check)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory."""
        if (self.root / "data" / "postmaster.pid").exists():
            self._cmd("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalPostgres":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(argv: list[str], run_as: tuple[int, int] | None, check: bool = True) -> subprocess.CompletedProcess:
    def demote() -> None:
        if run_as is not None:
            os.setgid(run_as[1])
            os.setuid(run_as[0])
    r = subprocess.run(argv, capture_output=True, text=True, preexec_fn=demote if run_as else None, timeout=120,
                       cwd="/")
    if check and r.returncode != 0:
        raise LocalPostgresError(f"{Path(argv[0]).name} failed ({r.returncode}): "
                                 f"{(r.stderr or r.stdout).strip()[-800:]}")
    return r


def start(*, durable: bool = True, base: str | None = None) -> LocalPostgres:
    """initdb and start a server in a new temporary directory. durable=False turns off
    fsync (tests: nothing there depends on surviving a power cut, and it is faster)."""
    run_as = None
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise LocalPostgresError("running as root needs the 'postgres' system user (apt-get install "
                                     "postgresql) to run the server as") from None
        run_as = (pw.pw_uid, pw.pw_gid)
    root = Path(tempfile.mkdtemp(prefix="balloon-lab-pg-", dir=base))
    if run_as:
        os.chown(root, *run_as)
    server = LocalPostgres(root, "", run_as)
    try:
        server._cmd("initdb", "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync", "--no-instructions")
        opts = f"-k {root} -c listen_addresses='' -c max_connections=200"
        if not durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        server._cmd("pg_ctl", "-D", str(root / "data"), "-l", str(root / "server.log"), "-o", opts, "-w",
                    "-t", "60", "start")
    except BaseException:
        server.stop()
        raise
    server.url = f"postgresql://postgres@/postgres?host={root}"
    return server
