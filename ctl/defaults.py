"""Where atomnet looks when told nothing: the CLI, the daemon's loader, the CNI plugin's entry
and the node API's socket naming all mean the same store and bpffs root. It imports nothing, on
purpose: the light entries (CNI plugin, pod verbs) import it before anything else."""

DEFAULT_STORE = "sqlite:///var/lib/atomnet/state.db"
DEFAULT_BPFFS = "/sys/fs/bpf/atomnet"
