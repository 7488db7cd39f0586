"""The local stack's ports: drawn where outgoing connections cannot take them first."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from chatobs.stack import free_port

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@pytest.mark.skipif(not RANGE.exists(), reason="Linux's ephemeral port range")
def test_free_ports_are_drawn_below_the_ephemeral_range_and_can_be_bound():
    ephemeral_start = int(RANGE.read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    assert all(10_000 <= port < ephemeral_start for port in ports), (ports, ephemeral_start)
    assert len(set(ports)) > 10, "drawn at random: two probes at once should not meet"
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("holder_listens", [True, False], ids=["port-answers", "port-silent"])
def test_a_server_whose_port_another_program_holds_is_refused_not_started(tmp_path, holder_listens):
    """A restarted server whose port another program took meanwhile: the port answered (the
    other program), the server exited failing to bind it, and the stack took it as started.

    The server may exit before the first probe of its port or just after: either way the error
    names the port and shows the server's own reason."""
    from chatobs.stack import _FACTORIES, StackError

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        if holder_listens:
            holder.listen()
        server = _FACTORIES["redis"](tmp_path)
        server.port = holder.getsockname()[1]
        try:
            with pytest.raises(StackError, match=rf"exited with 1 .*127\.0\.0\.1:{server.port}\b") as error:
                server.start()
            assert "Address already in use" in str(error.value)
        finally:
            server.stop()


@pytest.mark.parametrize("holder_listens", [True, False], ids=["port-answers", "port-silent"])
def test_a_stack_server_whose_drawn_port_another_program_takes_starts_on_the_next_draw(
    tmp_path, monkeypatch, holder_listens
):
    """The port drawn for a server, taken by another program before the server bound it (in a
    test run, other servers draw ports too): the stack did not start. Now it draws again."""
    import redis

    from chatobs import stack as stack_module

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        if holder_listens:
            holder.listen()
        taken = holder.getsockname()[1]
        draws = iter([taken])
        monkeypatch.setattr(stack_module, "free_port", lambda: next(draws, None) or free_port())
        elsewhere = {"DATABASE_URL": "postgresql://127.0.0.1:1/unused", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
        with stack_module.LocalStack(elsewhere, base_dir=tmp_path) as local:
            url = local.environment["REDIS_URL"]
            assert f":{taken}/" not in url
            assert redis.Redis.from_url(url).ping()
