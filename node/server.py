"""`infernode up`: bind the port, serve the API, start workers, and stop cleanly.

Signals: SIGTERM/SIGINT drain and stop everything; SIGUSR2 drains and exits leaving
the workers to their keepers, for a successor node to adopt (upgrades); SIGHUP
re-reads the config and lock and restarts only what changed, and re-reads the TLS
certificate, key and client CA (new connections use them; open ones keep theirs).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import ssl
import sys
from pathlib import Path

import uvloop

from node.app import Node
from node.config import Config, load_config
from node.errors import ConfigError, NodeError, OperationFailed
from node.gateway.dispatch import NodeApp
from node.gateway.listener import Server
from node.gateway.tls import server_context
from node.ops.logs import setup_logging
from node.ops.sdnotify import Notifier

log = logging.getLogger("infernode.server")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OperationFailed(f"port {port} on {host} is already in use (another node?); stop it or change [node].listen") from None
        raise OperationFailed(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _lock_data_dir(data_dir: Path) -> int:
    """One node per data_dir: hold an exclusive lock for the node's lifetime."""
    run = data_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / "node.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OperationFailed(f"another node is running on {data_dir}; stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _tls_context(config: Config) -> ssl.SSLContext | None:
    n = config.node
    if n.tls_cert is None or n.tls_key is None:
        return None
    return server_context(n.tls_cert, n.tls_key, n.tls_client_ca)


async def _reload(node: Node, server: Server, config: Config) -> None:
    """SIGHUP: reload, logging (not raising) a bad config or certificate so the node keeps running."""
    if server.tls is not None:
        try:
            await server.set_tls(await asyncio.to_thread(_tls_context, config))
            log.info("TLS certificate reloaded from %s", config.node.tls_cert)
        except NodeError as exc:
            log.error("TLS reload failed, keeping the running certificate: %s", exc)
    try:
        await node.reload()
    except NodeError as exc:
        log.error("reload failed, keeping the running config: %s", exc)


def make_server(node: Node, config: Config, sock: socket.socket) -> Server:
    """The HTTP server for the node's port, with the `[node]` limits."""
    n = config.node
    app = NodeApp(node, sock.getsockname()[:2])
    return Server(app, max_body_bytes=n.max_body_bytes, request_timeout_s=n.request_timeout_s,
                  keep_alive_s=n.keep_alive_s, write_stall_s=n.write_stall_s, max_connections=n.max_connections,
                  max_connections_per_ip=n.max_connections_per_ip, head_check=app.check_head,
                  handshake_timeout_s=n.tls_handshake_timeout_s)


def _status_line(node: Node, config: Config) -> str:
    """One line for `systemctl status`: where the node listens and whether it is ready."""
    ok, reasons = node.readiness()
    state = f"ready, serving {', '.join(node.ready_models())}" if ok else f"not ready: {reasons[0] if reasons else 'starting'}"
    return f"listening on {config.node.scheme}://{config.node.listen}; {state}"


async def serve(config: Config, node: Node | None = None, notifier: Notifier | None = None) -> None:
    """Run the node until a signal stops it."""
    node = node or Node(config)
    notifier = notifier or Notifier.from_environ()
    lock_fd = _lock_data_dir(config.data_dir)
    tls = _tls_context(config)  # a bad certificate stops the start, before the port is taken
    sock = _bind(config.node.host, config.node.port)
    await node.open()
    server = make_server(node, config, sock)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    mode = {"detach": False}

    def stop(detach: bool) -> None:
        if not stopping.is_set():
            mode["detach"] = detach
            log.info("received %s: %s", "SIGUSR2" if detach else "stop signal",
                     "draining, leaving workers for adoption" if detach else "draining and stopping workers")
            stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, False)
    loop.add_signal_handler(signal.SIGUSR2, stop, True)
    reloads: set[asyncio.Task] = set()  # strong references until each reload finishes

    def reload() -> None:
        log.info("received SIGHUP: re-reading %s and models.lock", config.path)
        task = asyncio.create_task(_reload(node, server, config))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)

    await server.start(sock, tls)
    where = f"{config.node.scheme}://{config.node.listen}"
    log.info("listening on %s%s", where, " (client certificates required)" if config.node.tls_client_ca else "")
    # systemd (Type=notify): ready once the API answers; workers start behind /readyz.
    notifier.ready(f"listening on {where}")
    watchdog = asyncio.create_task(notifier.run(lambda: _status_line(node, config)))
    starting = asyncio.create_task(node.start_workers())
    await stopping.wait()
    notifier.stopping("draining, leaving workers for adoption" if mode["detach"] else "draining and stopping workers")
    await node.drain(config.node.drain_grace_s)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    await node.shutdown(detach=mode["detach"])
    await server.close(grace_s=5.0)
    # Keep pinging through the drain: a long drain must not look like a hang to systemd.
    watchdog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watchdog
    os.close(lock_fd)
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    """`python -m node.server CONFIG`: what `infernode up` becomes; one line and exit 2/1 on failure."""
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(args[0] if args else None)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    writer = setup_logging(cfg.node.log_format)
    try:
        uvloop.run(serve(cfg))
    except ConfigError as exc:   # found at start (a short admin key, a bad models.lock): bad config, exit 2
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    except NodeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        writer.stop()


if __name__ == "__main__":
    main()
