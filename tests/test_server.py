import asyncio
import json
import os
import socket
import stat

import pytest

from captiond.events import Command, Final, Hello, Partial, Pong, SpeechStart, Status
from captiond.server import Server, ServerError


def make_server(path, **kw):
    def on_command(cmd: Command):
        return Pong() if cmd.cmd == "ping" else Status("listening", "ok")

    return Server(path, hello=lambda: Hello("t", "m", 16000, "listening"), on_command=on_command, **kw)


async def read_event(reader, timeout=5.0):
    return json.loads(await asyncio.wait_for(reader.readline(), timeout))


def final(utt):
    return Final(utt, 0.0, 1.0, f"utterance {utt}", (), "en", 0.1)


def partial(utt, rev):
    return Partial(utt, rev, 0.0, 1.0, "", "x", "x")


def test_hello_first_then_gap_free_seq_to_every_subscriber(tmp_path):
    async def main():
        server = make_server(tmp_path / "s.sock")
        await server.start()
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
        clients = [await asyncio.open_unix_connection(str(server.path)) for _ in range(3)]
        hellos = [await read_event(r) for r, _ in clients]
        assert all(h["type"] == "hello" and h["protocol"] == 1 for h in hellos)
        for i in range(1, 6):
            server.publish(SpeechStart(i, float(i)))
        for r, _ in clients:
            seqs = [(await read_event(r))["seq"] for _ in range(5)]
            assert seqs == [1, 2, 3, 4, 5]
        await server.close()
        assert not server.path.exists()

    asyncio.run(main())


def test_stalled_reader_loses_events_others_do_not(tmp_path):
    async def main():
        server = make_server(tmp_path / "s.sock", client_queue=8)
        await server.start()
        # A raw socket with a tiny receive buffer that is never read: the kernel fills, then our queue.
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stalled.connect(str(server.path))
        reader, _ = await asyncio.open_unix_connection(str(server.path))
        await read_event(reader)
        got = []
        for utt in range(1, 1001):
            server.publish(partial(utt, 1))
            server.publish(final(utt))  # publish never waits, whatever the stalled client does
            while True:
                try:
                    got.append(json.loads(await asyncio.wait_for(reader.readline(), 0.001)))
                except asyncio.TimeoutError:
                    break
        while len([e for e in got if e["type"] == "final"]) < 1000:
            got.append(await read_event(reader))
        assert [e["utt"] for e in got if e["type"] == "final"] == list(range(1, 1001))
        assert not any(e["type"] == "lost" for e in got)
        # The stalled client's queue stayed bounded and it is told what it missed when it reads.
        stalled_client = max(server._clients.values(), key=lambda c: c.lost)
        assert len(stalled_client.queue) <= 8 and stalled_client.lost > 0
        stalled.setblocking(False)
        data = b""
        for _ in range(200):
            await asyncio.sleep(0.01)
            try:
                data += stalled.recv(1 << 20)
            except BlockingIOError:
                pass
            if b'"lost"' in data:
                break
        events = [json.loads(line) for line in data.splitlines() if line.strip()]
        assert any(e["type"] == "lost" and e["count"] > 0 for e in events)
        stalled.close()
        await server.close()

    asyncio.run(main())


def test_a_full_queue_drops_partials_before_finals(tmp_path):
    async def main():
        server = make_server(tmp_path / "s.sock", client_queue=8)
        await server.start()
        reader, _ = await asyncio.open_unix_connection(str(server.path))
        await read_event(reader)
        for i in range(1, 1000):  # published while the client reads nothing: only 8 fit
            server.publish(partial(i, 1))
        server.publish(final(999))
        got = []
        while not got or got[-1]["type"] != "final":
            got.append(await read_event(reader))
        assert got[0]["type"] == "lost" and got[0]["count"] == 1000 - 8
        assert len(got) == 1 + 8 and got[-1]["utt"] == 999
        await server.close()

    asyncio.run(main())


def test_malformed_lines_get_an_error_and_the_connection_stays(tmp_path):
    async def main():
        server = make_server(tmp_path / "s.sock")
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        await read_event(reader)
        for bad in [b"garbage\n", b"\xff\xfe\n", b'{"cmd":"dance"}\n', b"[]\n", b"x" * 100000 + b"\n"]:
            writer.write(bad)
            event = await read_event(reader)
            assert event["type"] == "error" and event["message"]
        writer.write(b'{"cmd":"ping"}\n')
        while (event := await read_event(reader))["type"] == "error":
            pass  # the tail of the over-long line is reported once more
        assert event["type"] == "pong"
        await server.close()

    asyncio.run(main())


def test_subscribe_filters_and_replays_finals_since(tmp_path):
    async def main():
        server = make_server(tmp_path / "s.sock", keep_finals=3)
        await server.start()
        for utt in range(1, 6):
            server.publish(partial(utt, 1))
            server.publish(final(utt))
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        hello = await read_event(reader)
        assert hello["seq"] == 10
        writer.write(b'{"cmd":"subscribe","types":["final"],"since":6}\n')
        replay = [await read_event(reader) for _ in range(2)]
        assert [e["utt"] for e in replay] == [4, 5]
        server.publish(partial(6, 1))
        server.publish(final(6))
        live = await read_event(reader)
        assert live["type"] == "final" and live["utt"] == 6 and live["seq"] == 12
        await server.close()

    asyncio.run(main())


def test_live_socket_is_refused_and_stale_one_replaced(tmp_path):
    async def main():
        path = tmp_path / "s.sock"
        first = make_server(path)
        await first.start()
        with pytest.raises(ServerError, match="already listening"):
            await make_server(path).start()
        await first.close()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))  # bound, never listening: what a killed daemon leaves behind
        stale.close()
        second = make_server(path)
        await second.start()
        reader, _ = await asyncio.open_unix_connection(str(path))
        assert (await read_event(reader))["type"] == "hello"
        await second.close()

    asyncio.run(main())


def test_a_plain_file_in_the_way_is_not_removed(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("important")

    async def main():
        with pytest.raises(ServerError, match="not a socket"):
            await make_server(path).start()

    asyncio.run(main())
    assert path.read_text() == "important"


def test_group_socket_is_0660_and_peers_are_logged(tmp_path, caplog):
    import grp
    import logging

    async def main():
        server = make_server(tmp_path / "s.sock", mode=0o660, group="audio")
        await server.start()
        st = os.stat(server.path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam("audio").gr_gid
        reader, _ = await asyncio.open_unix_connection(str(server.path))
        await read_event(reader)
        await server.close()

    with caplog.at_level(logging.INFO, logger="captiond.server"):
        asyncio.run(main())
    assert f"pid={os.getpid()} uid={os.getuid()}" in caplog.text


def test_unknown_group_is_a_clear_error(tmp_path):
    async def main():
        with pytest.raises(ServerError, match="server.group: no such group 'nosuchgroup'"):
            await make_server(tmp_path / "s.sock", group="nosuchgroup").start()

    asyncio.run(main())
