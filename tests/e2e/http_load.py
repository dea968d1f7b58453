"""A bounded HTTP load loop run inside a client pod: one new TCP connection per request,
closed with RST (SO_LINGER 0, netperf TCP_CRR style, so no TIME_WAIT piles up), for a
fixed time or request count. Prints one JSON object: ok, failed, by_body, errors."""
import collections
import json
import os
import socket
import struct
import sys
import time


def one(host: str, port: int, timeout: float) -> str:
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode(errors="replace") or "empty reply")
    return body.decode().strip()


def main() -> None:
    host, port, seconds, max_requests = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    # Optional: run until STOP_FILE exists and at least MIN_REQUESTS were made (the test
    # says when it is done, instead of guessing a duration).
    stop_file, min_requests = (sys.argv[5], int(sys.argv[6])) if len(sys.argv) > 6 and sys.argv[5] else (None, 0)
    timeout = float(sys.argv[7]) if len(sys.argv) > 7 else 2.0   # per request
    by_body, errors = collections.Counter(), collections.Counter()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and n < max_requests:
        if stop_file and n >= min_requests and n % 100 == 0 and os.path.exists(stop_file):
            break
        n += 1
        try:
            by_body[one(host, port, timeout)] += 1
        except Exception as exc:  # counted, reported: the test decides
            errors[f"{type(exc).__name__}: {exc}"] += 1
    print(json.dumps({"ok": sum(by_body.values()), "failed": sum(errors.values()),
                      "by_body": by_body, "errors": errors}))


if __name__ == "__main__":
    main()
