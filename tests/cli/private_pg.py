"""A PostgreSQL cluster of the test's own (initdb into a temporary directory, its own port and
socket directory), for the tests that stop and restart the manifest's server; and the reaping of
those a killed test run left running."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.cli.outage_helpers import pg_conninfo
from tests.conftest import PG_REQUIRED

#: In each cluster's directory: the pid of the test process that made it (see reap_orphans).
OWNER = "owner.pid"


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateCluster:
    """initdb into a temporary directory; started on its own port with its socket directory in
    there. Never the shared server. As root (PostgreSQL refuses to run as root) every server
    binary runs as the ``postgres`` user through ``setpriv``, and the directory is given to it."""

    def __init__(self, bindir: Path, root: Path | None = None) -> None:
        """A new cluster directory, or (``root``) one made before, to stop and remove."""
        self.bindir = bindir
        self.root = root or Path(tempfile.mkdtemp(prefix="uploader-pg-"))
        if root is None:
            (self.root / OWNER).write_text(str(os.getpid()))
        self.data = self.root / "data"
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise RuntimeError("running as root and no setpriv to run PostgreSQL as postgres")
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.prefix = [
                setpriv,
                f"--reuid={pw.pw_uid}",
                f"--regid={pw.pw_gid}",
                "--clear-groups",
                "--",
            ]

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self.prefix, *args],
            check=True,
            capture_output=True,
            timeout=timeout,
            cwd=self.root,
        )

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            opts,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(pg_conninfo(self.url("postgres")), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie does not (killed, its exit not yet collected: where the
    machine's init does not collect orphans' exits, a killed test run stays one for a while)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc to tell: taken as alive (never reaped wrongly)
    return stat.rpartition(")")[2].split()[0] != "Z"


def reap_orphans(bindir: Path) -> list[Path]:
    """Stop and remove the private clusters whose test process is gone (a run killed before its
    fixture's teardown: its server would run on, holding memory and a port, until the machine
    stops). A directory whose owner is alive, or not yet written, is left alone. The ones
    removed."""
    removed = []
    for root in sorted(Path(tempfile.gettempdir()).glob("uploader-pg-*")):
        try:
            owner = int((root / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if not _alive(owner):
            PrivateCluster(bindir, root=root).destroy()
            removed.append(root)
    return removed


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[PrivateCluster]:
    bindir = _pg_bin()
    if bindir is None:
        reason = "no initdb (PostgreSQL server binaries) on this machine"
        if PG_REQUIRED:
            pytest.fail(f"{reason} (UPLOADER_TEST_POSTGRES=required)")
        pytest.skip(f"{reason}: the server-restart test needs a cluster of its own")
    reap_orphans(bindir)
    cluster = PrivateCluster(bindir)
    try:
        cluster.init()
        cluster.start()
    except (subprocess.CalledProcessError, RuntimeError, KeyError) as exc:
        cluster.destroy()
        detail = getattr(exc, "stderr", b"") or b""
        reason = (
            f"cannot start a private PostgreSQL cluster: {exc} {detail.decode(errors='replace')}"
        )
        if PG_REQUIRED:
            pytest.fail(f"{reason} (UPLOADER_TEST_POSTGRES=required)")
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        cluster.destroy()
