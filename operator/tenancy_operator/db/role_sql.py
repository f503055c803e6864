"""SQL on roles of any kind (a tenant's owner, its login roles, temporary logins): the marker
comment, role settings, LOGIN and PASSWORD, the operator's membership for the statements that need
it, and ``run_batch`` for sending such statements in one round trip.

Identifiers go through ``sql.Identifier``; values are parameters. ``ALTER ROLE ... PASSWORD``
cannot take a bind parameter, so it gets a client-side SCRAM verifier as ``sql.Literal``:
the clear-text password never reaches the server, its logs or ``pg_stat_activity``.

The operator holds no standing membership in tenant roles: it is granted one for the statements
that need it (a schema owned by the role, the role's sessions, its tables, dropping it) and revoked
in the same transaction (``membership_statements``, ``acting_for``). Standing membership in N roles
would make every new tenant cost O(N²): each membership check walks the whole list of the
operator's memberships, and every CREATE/ALTER ROLE resets the cache of it (bench/membership.py
measures the cost). It is also less privilege held.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator, Sequence

from psycopg import sql

from tenancy_operator.db.targets import Conn


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def scram_sha256_verifier(password: str, iterations: int = 4096) -> str:
    """The verifier PostgreSQL stores for SCRAM-SHA-256 (RFC 5802/7677), computed client-side."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def mark_role(role: str, marker: str) -> sql.Composed:
    return sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(role), sql.Literal(marker))


def set_idle_timeout(role: str, timeout: str) -> sql.Composed:
    """A tenant's idle transaction cannot hold its locks (and block the operator's work) forever.
    The tenant may change its own role's defaults; drift repair sets it again."""
    return sql.SQL("ALTER ROLE {} SET idle_in_transaction_session_timeout TO {}").format(
        sql.Identifier(role), sql.Literal(timeout))


def grant_role_to_operator(role: str) -> sql.Composed:
    return sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role))


def revoke_role_from_operator(role: str) -> sql.Composed:
    return sql.SQL("REVOKE {} FROM CURRENT_USER").format(sql.Identifier(role))


def membership_statements(role: str, statements: Sequence[sql.Composable]) -> list[sql.Composable]:
    """``statements`` between a GRANT and a REVOKE of ``role`` to the operator: for ``run_batch``,
    whose one implicit transaction never leaves the membership behind, not even on failure."""
    return [grant_role_to_operator(role), *statements, revoke_role_from_operator(role)] if statements else []


@contextlib.asynccontextmanager
async def acting_for(conn: Conn, role: str) -> AsyncIterator[None]:
    """Membership in ``role`` for the statements of the block, in one transaction with them."""
    async with conn.transaction():
        await conn.execute(grant_role_to_operator(role))
        yield
        await conn.execute(revoke_role_from_operator(role))


def set_search_path(role: str, schema: str) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} SET search_path TO {}").format(sql.Identifier(role), sql.Identifier(schema))


def login_statement(role: str, login: bool) -> sql.Composed:
    keyword = sql.SQL("LOGIN" if login else "NOLOGIN")
    return sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(role), keyword)


async def password_statement(role: str, password: str, iterations: int) -> sql.Composed:
    """``ALTER ROLE ... PASSWORD <verifier>``; PBKDF2 runs in a thread, not in the event loop."""
    verifier = await asyncio.to_thread(scram_sha256_verifier, password, iterations)
    return sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier))


async def run_batch(conn: Conn, statements: Sequence[sql.Composable]) -> None:
    """Run parameterless statements in one round trip (the simple query protocol).

    PostgreSQL runs such a batch as one implicit transaction: a failing statement undoes the
    ones before it, so a retried step starts from the state it observed."""
    if statements:
        await conn.execute(sql.SQL("; ").join(statements))


async def set_login(conn: Conn, role: str, login: bool) -> None:
    await conn.execute(login_statement(role, login))


async def set_password(conn: Conn, role: str, password: str, iterations: int) -> None:
    await conn.execute(await password_statement(role, password, iterations))
