"""atomnet as a CNI network plugin (podman, containerd, Kubernetes): protocol, plugin, install."""
