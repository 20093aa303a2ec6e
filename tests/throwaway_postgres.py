"""A throwaway PostgreSQL cluster for the tests, from the server package's own binaries.

Used when no server answers at ``IMAGINE_TEST_POSTGRES_URL``: ``initdb`` makes a
cluster in a new temporary folder (trust auth, user ``postgres``), ``pg_ctl``
starts it on a free port of 127.0.0.1, and :meth:`ThrowawayPostgres.stop`
stops it and deletes the folder. PostgreSQL refuses to run as root, so as root
the binaries run as the ``postgres`` user (which Debian's package creates)
through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy.engine import URL

INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: `sudo apt-get install postgresql`) "
    "or point IMAGINE_TEST_POSTGRES_URL at a server where the user may create databases"
)


class ThrowawayPostgresError(RuntimeError):
    """The throwaway cluster could not be made or started; the message says why."""


def server_bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: the newest Debian version, else the PATH."""
    debian = [
        path.parent
        for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if path.parent.parent.name.isdigit()
    ]
    if debian:
        return max(debian, key=lambda folder: int(folder.parent.name))
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def required_bin_dir(what: str) -> Path:
    """:func:`server_bin_dir` for a test that needs its own server: skipped without one,
    except under CI, where ``what`` must run."""
    import pytest

    bin_dir = server_bin_dir()
    if bin_dir is None:
        reason = "no PostgreSQL server is installed (Debian/Ubuntu: apt-get install postgresql)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI must run {what}: {reason}.")
        pytest.skip(reason)
    return bin_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ThrowawayPostgres:
    """One private PostgreSQL server: :meth:`start` gives its admin URL, :meth:`stop` ends it."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root: Path | None = None
        self.port = 0
        self._as_user: list[str] = []
        self._options = ""

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as_user, str(self.bin_dir / program), *args]
        result = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-2000:]
            raise ThrowawayPostgresError(f"`{program} {' '.join(args)}` failed: {output}")

    def start(self) -> URL:
        # A folder of its own under the system temp dir: pytest's are private to root,
        # and the postgres user must be able to reach this one.
        self.root = Path(tempfile.mkdtemp(prefix="imagine-test-postgres-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise ThrowawayPostgresError(
                    "PostgreSQL will not run as root and there is no `postgres` user to run it as"
                ) from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._run(
            "initdb",
            "--pgdata",
            str(self.data_dir),
            "--username",
            "postgres",
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        self.port = free_port()
        # Durability is worthless here; these settings make test databases cheap to create.
        self._options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self.start_again()
        return URL.create(
            "postgresql+asyncpg",
            username="postgres",
            host="127.0.0.1",
            port=self.port,
            database="postgres",
        )

    def _pg_ctl(self, *args: str) -> None:
        try:
            self._run("pg_ctl", "--pgdata", str(self.data_dir), *args)
        except ThrowawayPostgresError as exc:
            raise ThrowawayPostgresError(f"{exc}; its log ends: {self.log_tail()}") from None

    def _serve(self, action: str) -> None:
        # The log file matters: without one the server keeps pg_ctl's output pipe open.
        log = str(self.data_dir.parent / "postgres.log")
        self._pg_ctl(
            "--log", log, "--mode", "fast", "--wait", "--timeout", "60",
            "--options", self._options, action,
        )  # fmt: skip

    def start_again(self) -> None:
        """Start the server of a cluster that :meth:`start` made (after :meth:`shut_down`)."""
        self._serve("start")

    def shut_down(self) -> None:
        """Stop the server as an operator would (``-m fast``: sessions are ended), keeping
        the cluster for :meth:`start_again`."""
        self._serve("stop")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is ended, the server comes back."""
        self._serve("restart")

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run(
                    "pg_ctl",
                    "--pgdata",
                    str(self.data_dir),
                    "--mode",
                    "immediate",
                    "--wait",
                    "stop",
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def log_tail(self) -> str:
        if self.root is None or not (self.root / "postgres.log").exists():
            return ""
        return (self.root / "postgres.log").read_text(errors="replace")[-2000:]
