"""atomnet as a Docker network plugin: libnetwork remote network driver + IPAM driver."""
