"""A PgBouncer process of the tests' own, in front of the session's Postgres.

Debian's ``pgbouncer`` package (``.ci/run`` installs it) provides the binary; it is never run
as the system service. Each ``PgBouncer`` writes its ``pgbouncer.ini`` and ``userlist.txt`` into
a temporary directory, listens on a free port of 127.0.0.1 (no Unix socket), trusts the users
of its userlist and forwards every database name to the upstream server (``* =``). PgBouncer
refuses to run as root, so as root it runs as the account the throwaway cluster uses
(``listener.testing.cluster.unprivileged_user``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from listener.testing.cluster import RunAs, scratch_directory, unprivileged_user

_START_TIMEOUT_S = 20.0


def pgbouncer_binary() -> str | None:
    """The ``pgbouncer`` executable (PATH, then Debian's /usr/sbin), or None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    debian = Path("/usr/sbin/pgbouncer")
    return str(debian) if debian.is_file() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    """A userlist.txt field: double quotes, embedded ones doubled."""
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """PgBouncer in ``pool_mode`` in front of the server of ``upstream_dsn``.

    Args:
        upstream_dsn: ``postgresql://user[:password]@host:port/db`` of the real server; its
            user (and password) go into the userlist, so clients log in as that user.
        pool_mode: ``transaction`` (the mode that breaks session state), ``session`` or
            ``statement``.
        pool_size: server connections per database and user (``default_pool_size``).

    Raises (``start``):
        RuntimeError: no pgbouncer binary, or it exited or did not listen within 20 s (the
            message holds its log).
    """

    def __init__(
        self, upstream_dsn: str, *, pool_mode: str = "transaction", pool_size: int = 5
    ) -> None:
        self._upstream = urlsplit(upstream_dsn)
        self._pool_mode = pool_mode
        self._pool_size = pool_size
        self._proc: subprocess.Popen[bytes] | None = None
        self._directory: Path | None = None
        self._run_as: RunAs | None = None
        self.port = 0

    def start(self) -> None:
        """Write the config, start pgbouncer in the foreground and wait until it accepts."""
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
        self._run_as = unprivileged_user()
        self._directory = scratch_directory("listener-pgbouncer-", self._run_as)
        for attempt in range(3):
            self.port = _free_port()
            config = self._write_config()
            log = self._directory / "pgbouncer.log"
            with (self._directory / "stdout.log").open("wb") as out:
                self._proc = subprocess.Popen(
                    [binary, str(config)],
                    cwd=self._directory,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    user=self._run_as.uid if self._run_as else None,
                    group=self._run_as.gid if self._run_as else None,
                    extra_groups=[] if self._run_as else None,
                )
            if self._wait_listening():
                return
            text = self._output(log)
            self._terminate()
            if "Address already in use" in text and attempt < 2:
                continue
            raise RuntimeError(f"pgbouncer did not start:\n{text}")

    def dsn_for(self, database_dsn: str) -> str:
        """``database_dsn`` (a URL on the upstream server) pointed at this pooler instead."""
        parts = urlsplit(database_dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def stop(self) -> None:
        """Stop pgbouncer (SIGTERM, then SIGKILL) and delete its directory. Idempotent."""
        self._terminate()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def log(self) -> str:
        """What pgbouncer logged so far (for assertion messages)."""
        if self._directory is None:
            return ""
        return self._output(self._directory / "pgbouncer.log")

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _write_config(self) -> Path:
        assert self._directory is not None
        up = self._upstream
        user = unquote(up.username or "postgres")
        password = unquote(up.password or "")
        host = up.hostname or "127.0.0.1"
        port = up.port or 5432
        userlist = self._directory / "userlist.txt"
        userlist.write_text(f"{_quote(user)} {_quote(password)}\n")
        config = self._directory / "pgbouncer.ini"
        config.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={host} port={port}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {userlist}",
                    f"pool_mode = {self._pool_mode}",
                    f"default_pool_size = {self._pool_size}",
                    "max_client_conn = 500",
                    f"logfile = {self._directory / 'pgbouncer.log'}",
                    f"pidfile = {self._directory / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        if self._run_as is not None:
            for path in (userlist, config):
                os.chown(path, self._run_as.uid, self._run_as.gid)
        return config

    def _wait_listening(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _output(self, log: Path) -> str:
        assert self._directory is not None
        parts = []
        for path in (self._directory / "stdout.log", log):
            try:
                parts.append(path.read_text(errors="replace"))
            except OSError:
                continue
        return "\n".join(p for p in parts if p)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
