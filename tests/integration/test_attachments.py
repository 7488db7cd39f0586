"""An attachment the gateway refuses to keep leaves nothing on disk.

The real gateway runs on a database of its own in the session's PostgreSQL. A trigger makes
PostgreSQL refuse the attachment's insert after the session lookup has passed, as a server
shutting down does (SQLSTATE 57P01, ``admin_shutdown``: a 503 to the client) or as any other
database error would (a 500); the client is told nothing was stored, and nothing is.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import database_of_its_own

_REFUSE_ATTACHMENTS = """
create function refuse_attachment() returns trigger language plpgsql as $$
begin
    raise exception 'attachments refused by the test' using errcode = '{errcode}';
end $$;
create trigger refuse_attachment before insert on attachments for each row execute function refuse_attachment();
"""
_ACCEPT_ATTACHMENTS = "drop trigger refuse_attachment on attachments; drop function refuse_attachment();"


def sql(database_url: str, statements: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(statements)
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.fixture
def database(stack) -> Iterator[str]:
    """The URL of a new, empty database in the session's PostgreSQL (its triggers are this test's)."""
    with database_of_its_own(stack["DATABASE_URL"], f"attachments_{uuid.uuid4().hex[:8]}") as url:
        yield url


def files_under(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


@pytest.mark.parametrize(
    "errcode, status, error",
    [
        ("57P01", 503, "postgres is unavailable; nothing was stored, retry shortly"),
        ("P0001", 500, "internal error"),
    ],
    ids=["postgres shutting down", "any other database error"],
)
def test_an_attachment_whose_insert_fails_leaves_no_file(database, start_gateway, tmp_path, errcode, status, error):
    attachments = tmp_path / "attachments"  # where start_gateway's gateway stores them
    gateway = start_gateway(DATABASE_URL=database)
    session = httpx.post(f"{gateway.base_url}/v1/sessions", headers={"X-Tenant-ID": "acme"}).json()["session_id"]

    def upload() -> httpx.Response:
        # A connection each: uvicorn closes one after a request that raised (the 500s here).
        return httpx.post(f"{gateway.base_url}/v1/sessions/{session}/attachments", timeout=10,
                          files={"file": ("notes.txt", b"attached words", "text/plain")})  # fmt: skip

    sql(database, _REFUSE_ATTACHMENTS.format(errcode=errcode))
    for _ in range(3):  # the client retries, as a 503 invites it to
        refused = upload()
        assert (refused.status_code, refused.json()) == (status, {"error": error})
    assert files_under(attachments) == [], "refused uploads left their bytes on disk"

    sql(database, _ACCEPT_ATTACHMENTS)
    stored = upload()
    assert stored.status_code == 201
    assert [path.read_bytes() for path in files_under(attachments)] == [b"attached words"]
    assert files_under(attachments)[0].name == stored.json()["attachment_id"]
