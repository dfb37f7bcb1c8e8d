"""SSH ProxyCommand helper for the provisioning tests: relays stdin/stdout to ADDR:PORT (run inside a namespace with ip netns exec)."""

import os
import selectors
import socket
import sys


def main() -> None:
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(0, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is sock:
                data = sock.recv(65536)
                if not data:
                    return
                os.write(1, data)
            else:
                data = os.read(0, 65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    sel.unregister(0)
                    continue
                sock.sendall(data)


if __name__ == "__main__":
    main()
