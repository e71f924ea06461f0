"""Loopback helpers shared by the tests that start servers."""

from __future__ import annotations

import random
import socket

# Above Ray's worker ports (10002-19999 by default) and below Linux's ephemeral range (32768-60999): no process
# binding port 0 or connecting out is handed one of these between the check here and the server's own bind.
TEST_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, drawn at random from ``TEST_PORTS``.

    A port the kernel assigns (binding port 0) is ephemeral: the processes a Ray cluster
    starts in the meantime can be handed the same one, and a server told to use it then fails
    to bind ("Address already in use"), as a CLI test once did.
    """
    draw = random.SystemRandom()
    while True:
        port = draw.choice(TEST_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
