"""A minimal threaded SMTP server that refuses every recipient with 550, with hooks right after the last refusal
of a connection and after RSET: the place to crash a daemon while it records bounces."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class RefusingMX:
    """A minimal SMTP server (one thread per connection) that refuses every recipient with 550.

    ``on_last_refusal`` runs right after the reply to the ``expect``-th RCPT of a connection has
    been sent; ``on_rset`` right after the reply to a RSET.
    """

    address: str
    expect: int
    on_last_refusal: object = None
    on_rset: object = None
    rcpts: int = 0
    sock: socket.socket = field(init=False)
    thread: threading.Thread = field(init=False)

    def __post_init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.address, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket):
        f = conn.makefile("rb")
        per_connection = 0
        try:
            conn.sendall(b"220 mx.refuse.test ESMTP\r\n")
            for line in f:
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-mx.refuse.test\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    conn.sendall(b"250 2.1.0 OK\r\n")
                elif verb == b"RCPT":
                    per_connection += 1
                    self.rcpts += 1
                    conn.sendall(b"550 5.1.1 No such user here\r\n")
                    if per_connection == self.expect and self.on_last_refusal:
                        self.on_last_refusal()
                elif verb == b"RSET":
                    conn.sendall(b"250 2.0.0 OK\r\n")
                    if self.on_rset:
                        self.on_rset()
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 OK\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        # shutdown wakes the blocked accept(): close alone does not on Linux, and the blocked call
        # keeps the socket listening (completing handshakes nobody answers) and the thread alive.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
