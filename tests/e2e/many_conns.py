"""Run inside a pod: opens N TCP connections to HOST:PORT and holds them all open at once,
then sends one HTTP/1.0 request on each and reads its answer, then closes them with RST.
Prints one JSON object: opened, ok, failed, by_body (answer -> count), errors."""
import collections
import json
import socket
import struct
import sys


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    socks, by_body, errors = [], collections.Counter(), collections.Counter()
    for _ in range(count):
        try:
            s = socket.create_connection((host, port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            socks.append(s)
        except OSError as exc:
            errors[f"connect: {type(exc).__name__}: {exc}"] += 1
    opened = len(socks)   # every one of them is open now, at the same time
    for s in socks:
        try:
            s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            by_body[data.partition(b"\r\n\r\n")[2].decode().strip().split(":")[0]] += 1
        except OSError as exc:
            errors[f"request: {type(exc).__name__}: {exc}"] += 1
        finally:
            s.close()
    print(json.dumps({"opened": opened, "ok": sum(by_body.values()), "failed": sum(errors.values()),
                      "by_body": by_body, "errors": errors}))


if __name__ == "__main__":
    main()
