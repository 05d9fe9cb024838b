"""The throwaway cluster and the per-test database fixtures, against a real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from listener.testing.cluster import ClusterError, TemporaryCluster

# What a restart does to a connection that was open: the server ends it (57P01), and asyncpg
# reports that as a server error or as a closed connection, depending on timing.
_DROPPED = (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError)


async def _select_1(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT table_schema || '.' || table_name AS name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
    )
    return {r["name"] for r in rows}


async def test_server_answers(pg_admin_dsn: str) -> None:
    assert await _select_1(pg_admin_dsn) == 1


async def test_each_test_gets_a_migrated_copy_of_the_template(
    database_url: str, template_db: str, dsn_for: Callable[[str], str]
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT current_database()") != template_db
        before = await _tables(conn)
        assert await conn.fetchval("SELECT count(*) FROM listener.schema_migrations") >= 1
        await conn.execute("CREATE TABLE public.only_in_this_test (id int)")
    finally:
        await conn.close()

    template = await asyncpg.connect(dsn_for(template_db))
    try:
        assert await _tables(template) == before
        assert await template.fetchval("SELECT to_regclass('public.only_in_this_test')") is None
    finally:
        await template.close()


def test_env_for_subprocess_points_at_the_test_database(
    env_for_subprocess: dict[str, str], database_url: str
) -> None:
    assert env_for_subprocess["DATABASE_URL"] == database_url
    assert env_for_subprocess["LISTENER_DATABASE_URL"] == database_url
    assert "LISTENER_LISTEN_DATABASE_URL" not in env_for_subprocess


async def test_restart_keeps_the_dsn_and_stop_removes_the_directory() -> None:
    cluster = TemporaryCluster(fast=True)
    directory: Path | None = None
    try:
        dsn = cluster.start()
        directory = cluster.directory
        assert dsn == cluster.dsn
        assert dsn.startswith("postgresql://postgres@127.0.0.1:")
        assert directory.is_dir()

        before = await asyncpg.connect(dsn)
        try:
            cluster.restart()
            with pytest.raises(_DROPPED):
                await before.fetchval("SELECT 1")
        finally:
            before.terminate()

        assert cluster.dsn == dsn
        assert await _select_1(dsn) == 1
    finally:
        cluster.stop()

    assert directory is not None
    assert not directory.exists()
    cluster.stop()  # idempotent
    with pytest.raises(ClusterError):
        _ = cluster.dsn


def test_failed_start_raises_with_the_server_log_and_cleans_up() -> None:
    cluster = TemporaryCluster(server_options={"no_such_setting": "1"})
    with pytest.raises(ClusterError, match="no_such_setting"):
        cluster.start()
    with pytest.raises(ClusterError):
        _ = cluster.directory
    cluster.stop()  # safe after a failed start


def test_port_and_socket_dir_are_not_options() -> None:
    with pytest.raises(ValueError, match="port"):
        TemporaryCluster(server_options={"port": "5432"})


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has to hand the server to another user")
async def test_server_does_not_run_as_root(pg_cluster: TemporaryCluster | None) -> None:
    if pg_cluster is None:
        pytest.skip("DATABASE_URL given: the server is not ours")
    conn = await asyncpg.connect(pg_cluster.dsn)
    try:
        data_directory = await conn.fetchval("SELECT current_setting('data_directory')")
        assert os.stat(data_directory).st_uid != 0
        proc = Path(f"/proc/{await conn.fetchval('SELECT pg_backend_pid()')}")
        if proc.exists():  # Linux: the uid the backend process runs as
            assert proc.stat().st_uid != 0
    finally:
        await conn.close()


_OWNER_SCRIPT = """
import sys, time
from listener.testing.cluster import TemporaryCluster
cluster = TemporaryCluster()
cluster.start()
print(cluster.directory, flush=True)
try:
    time.sleep(120)
finally:
    cluster.stop()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_process_owning_a_cluster_stops_it_on_termination(sig: signal.Signals) -> None:
    """SIGTERM and SIGHUP reach the owner's clean-up as Ctrl+C does (their default: none)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        directory = Path(proc.stdout.readline().strip())
        assert (directory / "data" / "postmaster.pid").exists()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KeyboardInterrupt" in err
    assert not directory.exists()
