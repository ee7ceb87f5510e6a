"""systemd's sd_notify protocol over $NOTIFY_SOCKET, in a few lines of stdlib.

The protocol (sd_notify(3)): newline-separated `KEY=VALUE` assignments in one datagram
to the AF_UNIX socket named by $NOTIFY_SOCKET; a leading `@` names an abstract socket.
`READY=1` ends a Type=notify unit's start-up, `WATCHDOG=1` feeds WatchdogSec, whose
period systemd passes as $WATCHDOG_USEC (for $WATCHDOG_PID when that is set),
`STOPPING=1` announces shutdown, `STATUS=` is the line `systemctl status` shows.
Without $NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, MutableMapping

log = logging.getLogger("infernode.sdnotify")


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.is_stopping = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """Read $NOTIFY_SOCKET and $WATCHDOG_USEC; by default unset them so workers do not inherit them."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = _watchdog_usec(env)
        if unset:
            # Like sd_notify's unset_environment: a worker that speaks sd_notify itself must not
            # report on the node's behalf (systemd would reject it anyway with NotifyAccess=main).
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=VALUE lines; False (logged) when it cannot be delivered."""
        if not self.address:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(addr)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str) -> bool:
        self.is_stopping = True  # from here on the shutdown's own STATUS lines stand
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog period, as sd_watchdog_enabled(3) advises."""
        if not self.address or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1e6

    async def run(self, status: Callable[[], str] | None = None, status_every_s: float = 5.0) -> None:
        """Until cancelled: ping the watchdog every WATCHDOG_USEC/2 and send STATUS= when status() changes.

        The pings come from the event loop, so a wedged loop misses them and systemd restarts the node.
        """
        if not self.enabled:
            return
        ticks = [t for t in (self.watchdog_interval_s, status_every_s if status else None) if t]
        if not ticks:
            return
        last = None
        while True:
            if self.watchdog_usec:
                self.watchdog()
            if status is not None and not self.is_stopping and (line := status()) != last:
                self.status(line)
                last = line
            await asyncio.sleep(min(ticks))


def _watchdog_usec(env: MutableMapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # the watchdog is meant for another process
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
