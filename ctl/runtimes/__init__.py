"""Container runtimes attaching to atomnet: cni (the CNI plugin), docker (libnetwork driver)."""
