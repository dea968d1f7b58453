"""A `pod add` pod's resolver configuration: /etc/netns/NAME/resolv.conf, which
`ip netns exec NAME` bind-mounts over /etc/resolv.conf for whatever runs in the pod.
Only named namespaces (under /run/netns) have such a file; a file atomnet did not write
(no mark on its first line) is left alone, on add and on delete alike."""
from __future__ import annotations

from pathlib import Path

from ..errors import AtomnetError
from ..state.names import RESOLV_CONF_MARK, render_resolv_conf
from .netplumb import NETNS_DIR

ETC_NETNS = Path("/etc/netns")


def path_for(netns: Path) -> Path | None:
    return ETC_NETNS / netns.name / "resolv.conf" if netns.parent == NETNS_DIR else None


def _ours(path: Path) -> bool:
    try:
        with path.open() as fh:
            return fh.readline().rstrip("\n") == RESOLV_CONF_MARK
    except FileNotFoundError:
        return True   # absent: ours to write
    except OSError:
        return False


def write(netns: Path, cfg: dict) -> Path | None:
    """Writes the pod's resolv.conf (atomically: a reader never sees half a file); returns its path,
    or None when the namespace has no /etc/netns entry or someone else's file is there."""
    path = path_for(netns)
    if path is None or not _ours(path):
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".resolv.conf.atomnet")
        tmp.write_text(render_resolv_conf(cfg))
        tmp.replace(path)
    except OSError as exc:
        raise AtomnetError(f"cannot write {path}: {exc.strerror}") from None
    return path


def remove(netns: Path) -> None:
    path = path_for(netns)
    if path is None or not path.exists() or not _ours(path):
        return
    path.unlink()
    try:
        path.parent.rmdir()   # only if now empty: other files there are not ours
    except OSError:
        pass
