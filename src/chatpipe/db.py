"""PostgreSQL schema of the pipeline, applied idempotently by every service at start.

Tables:

* ``sessions``: chat sessions and their tenant;
* ``outbox``: messages accepted by the gateway, stored in the same transaction as the
  reply; the publisher moves them to the WAL topic and stamps ``sent_at``; the replicator
  stamps ``confirmed_at`` once the message is in ``replicated_messages``. A row sent but
  never confirmed (a broker that lost it) is sent again (``deliveries`` counts the sends).
  A row that becomes pending (added, or made pending again) notifies channel
  :data:`OUTBOX_CHANNEL` when its transaction commits, so the publisher need not poll.
  A row too large to be sent (the producer refuses it) is parked: ``parked_at`` and
  ``parked_reason`` set, no longer sent, until an operator clears ``parked_at``;
* ``replicated_messages``: the replicator's copy of the WAL, keyed by ``message_id`` so a
  record delivered twice is stored once;
* ``attachments``: uploaded files' metadata (the bytes live under ``CHATPIPE_ATTACHMENT_DIR``).
"""

from __future__ import annotations

import asyncpg

__all__ = ["OUTBOX_CHANNEL", "SCHEMA", "connect_pool", "migrate"]

#: LISTEN/NOTIFY channel told of every outbox row that becomes pending.
OUTBOX_CHANNEL = "outbox"

SCHEMA = """
create table if not exists sessions (
    id text primary key,
    tenant text not null,
    created_at timestamptz not null default now(),
    deleted_at timestamptz
);
create table if not exists outbox (
    id bigserial primary key,
    message_id text not null unique,
    session_id text not null,
    payload jsonb not null,
    traceparent text,
    created_at timestamptz not null default now(),
    sent_at timestamptz
);
alter table outbox add column if not exists parked_at timestamptz;
alter table outbox add column if not exists parked_reason text;
drop index if exists outbox_unsent;
create index if not exists outbox_claimable on outbox (id) where sent_at is null and parked_at is null;
alter table outbox add column if not exists confirmed_at timestamptz;
alter table outbox add column if not exists deliveries integer not null default 0;
create index if not exists outbox_unconfirmed on outbox (sent_at) where confirmed_at is null and sent_at is not null;
create index if not exists outbox_confirmed on outbox (confirmed_at) where confirmed_at is not null;
create table if not exists replicated_messages (
    message_id text primary key,
    session_id text not null,
    tenant text not null,
    role text not null,
    content text not null,
    accepted_at timestamptz not null,
    replicated_at timestamptz not null default now()
);
-- Rows replicated before outbox.confirmed_at existed are confirmed (cheap once done: the index is small).
update outbox o set confirmed_at = r.replicated_at from replicated_messages r
where o.confirmed_at is null and o.sent_at is not null and r.message_id = o.message_id;
create or replace function chatpipe_outbox_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('outbox', '');  -- OUTBOX_CHANNEL; one a transaction: PostgreSQL folds repeats
    return null;
end $$;
do $$ begin
    if not exists (select 1 from pg_trigger
                   where tgname = 'outbox_pending_notify' and tgrelid = 'outbox'::regclass) then
        create trigger outbox_pending_notify after insert or update of sent_at on outbox
            for each row when (new.sent_at is null) execute function chatpipe_outbox_notify();
    end if;
end $$;
create table if not exists attachments (
    id text primary key,
    session_id text not null references sessions (id),
    filename text not null,
    content_type text not null,
    size_bytes bigint not null,
    path text not null,
    created_at timestamptz not null default now()
);
"""

# Services start together; concurrent CREATE ... IF NOT EXISTS can still collide in the
# catalogue, so migrations take a transaction-level advisory lock.
_MIGRATION_LOCK = 0x636861747069  # "chatpi"


async def migrate(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("select pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await connection.execute(SCHEMA)


async def connect_pool(
    database_url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float = 10.0,
    idle_in_transaction_seconds: float | None = None,
) -> asyncpg.Pool:
    """A pool whose connection attempts time out rather than hang on a dead server
    (``CHATPIPE_DB_POOL_SIZE`` and ``CHATPIPE_DB_COMMAND_TIMEOUT_SECONDS`` in the services).

    ``idle_in_transaction_seconds``: the server ends a session left that long inside a
    transaction, so a client cut off mid-transaction (its host gone, no TCP reset) does not
    hold its locks until TCP gives up.
    """
    server_settings = {}
    if idle_in_transaction_seconds is not None:
        server_settings["idle_in_transaction_session_timeout"] = str(int(idle_in_transaction_seconds * 1000))
    return await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size, timeout=5,
                                     command_timeout=command_timeout, server_settings=server_settings)  # fmt: skip
