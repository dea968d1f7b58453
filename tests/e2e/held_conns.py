"""Long-lived connections carrying data, run inside a client pod: opens COUNT TCP
connections to HOST:PORT (an echo server behind a service) and, until STOP_FILE exists,
sends a numbered line on each in turn and reads its echo. A connection that is reset,
times out or echoes the wrong line is counted as broken (and not reopened: the point is
whether established connections survive). Prints "ready" once every connection has
echoed once, then at the end one JSON object: rounds, broken, errors."""
import collections
import json
import os
import socket
import sys
import time


def main() -> None:
    host, port, count, stop_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 15.0
    conns = {}
    for i in range(count):
        conns[i] = socket.create_connection((host, port), timeout=timeout)
    errors: collections.Counter = collections.Counter()
    rounds = 0
    while conns and not (rounds > 0 and os.path.exists(stop_file)):
        for i, s in list(conns.items()):
            line = f"{i} {rounds}\n".encode()
            try:
                s.sendall(line)
                got = b""
                while not got.endswith(b"\n"):
                    chunk = s.recv(64)
                    if not chunk:
                        raise ConnectionError("closed by the peer")
                    got += chunk
                if got != line:
                    raise ConnectionError(f"echoed {got!r} for {line!r}")
            except (OSError, ConnectionError) as exc:
                errors[f"{type(exc).__name__}: {exc}"] += 1
                s.close()
                del conns[i]
        if rounds == 0:
            print("ready", flush=True)
        rounds += 1
        time.sleep(0.02)   # pacing between rounds of traffic, not synchronisation
    for s in conns.values():
        s.close()
    print(json.dumps({"rounds": rounds, "broken": sum(errors.values()), "errors": errors}), flush=True)


if __name__ == "__main__":
    main()
