"""Cluster DNS on every node: records.py (the name index), server.py (UDP+TCP on the DNS VIP),
upstream.py (forwarding with a cache), service.py (what the daemon runs), client.py (the CLI's side)."""
