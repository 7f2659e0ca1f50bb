"""The preference store on a real PostgreSQL server (Debian's ``postgresql`` package): initdb into a temporary
folder, pg_ctl start on a free port, then the SQLite checks of test_feedback.py against it. Skipped when
PostgreSQL's programs or psycopg are not installed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_feedback import (  # noqa: F401  (fixtures)
    check_api,
    check_schema_version,
    check_store_round_trip,
    generator,
    make_client,
    runs_root,
)

pytestmark = pytest.mark.slow


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).is_file():
            return str(d / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    # not under pytest's root-only tmp folder: the postgres user must reach it
    base = Path(tempfile.mkdtemp(prefix="scoreaction-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's postgres user
        runuser = shutil.which("runuser")
        if not runuser:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        prefix = [runuser, "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    subprocess.run(
        [*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "scoreaction"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*prefix, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://scoreaction@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_store_round_trip_and_restart_postgres(pg_url):
    check_store_round_trip(pg_url)


def test_schema_version_postgres(pg_url):
    check_schema_version(pg_url)


def test_api_store_export_images_restart_postgres(pg_url, generator, runs_root):  # noqa: F811
    check_api(make_client(generator, runs_root, pg_url), lambda: make_client(generator, runs_root, pg_url))
