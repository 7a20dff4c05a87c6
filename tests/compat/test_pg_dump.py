"""pg_dump --schema-only through pgwarden.

Strategy: the unrestricted role must get exactly what a direct connection as the
service account gets (pgwarden forwards dba's statements untouched), compared line
by line. Support is refused clearly: pg_dump's first step, set_config('search_path',
'', false), is a search_path change, which restricted roles may not make; pg_dump
stops with pgwarden's message and writes no schema.
"""

from __future__ import annotations

import subprocess

import pytest
from conftest import SVC_PASSWORD, SVC_USER, Proxy

from proxy.pgserver import PgServer, bin_dir

from .conftest import CompatRecord, Pii
from .scenario import POLICY_REFUSAL, SCHEMA_DUMP, Role

CLIENT = "pg_dump"


def dump(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir() / "pg_dump"), "--schema-only", "--no-password"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def ddl(output: str) -> list[str]:
    """The dump without pg_dump's per-run \\restrict key lines."""
    return [
        line for line in output.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))
    ]


@pytest.mark.compat(client=CLIENT, feature=SCHEMA_DUMP)
def test_schema_only_dump(
    compat_proxy: Proxy,
    pg: PgServer,
    role: Role,
    pii: Pii,
    compat_record: CompatRecord,
) -> None:
    env = compat_proxy.env(role.user, role.password, PGSSLMODE="disable")
    through = dump(env)
    pii.check(role, [through.stdout, through.stderr], "pg_dump")
    if role.restricted:
        assert through.returncode == 1
        assert "ERROR:  pgwarden: function pg_catalog.set_config()" in through.stderr
        assert "CREATE TABLE" not in through.stdout
        compat_record.refused(POLICY_REFUSAL, "pg_dump begins by clearing search_path")
        return
    assert (through.returncode, through.stderr) == (0, "")
    direct_env = dict(env, PGHOST=pg.host, PGPORT=str(pg.port), PGUSER=SVC_USER)
    direct_env["PGPASSWORD"] = SVC_PASSWORD
    direct = dump(direct_env)
    assert direct.returncode == 0, direct.stderr
    assert "CREATE TABLE public.customers (" in through.stdout
    assert ddl(through.stdout) == ddl(direct.stdout)
