"""How atomnet's commands start: the `atomnet` command (`make build` writes .venv/bin/atomnet
over pip's console script) and the CNI plugin shim (`atomnet cni install`) are launchers that
run Python without site (`-S`) and call the same entry point pip's script would.

Why: on a machine with site hooks, the interpreter's start-up is most of a `pod add` through
the node API. Processing site-packages' .pth files (an editable install's finder, and whatever
else the machine puts there: here a .pth that imports certifi) costs 40-60 ms before atomnet
runs a line, while the fast paths (pod add/del and CNI ADD/DEL handed to the daemon) need only
the standard library. Whatever needs more (pyroute2, structlog, the store clients, bcc) calls
`full_environment()` first: `site.main()`, which the site module documents as the way to add
the site directories after -S. Then sys.path, sys.prefix and the .pth files' effects are what
a normal start gives, so every other verb runs as it always did.

Only a launcher defers site (`run` records it): `python -S -m ctl.cli`, run by hand, keeps
the environment it was given.

This module imports nothing at import time beyond sys: the launchers load it first.
"""
from __future__ import annotations

import sys

_site_deferred = False   # set by run(): the launcher skipped site, full_environment() owes it


def run(module: str, func: str) -> int:
    """The launcher's body: call module.func() (a console-script entry point) with site deferred."""
    global _site_deferred
    _site_deferred = bool(sys.flags.no_site)
    return getattr(__import__(module, fromlist=[func]), func)()


def full_environment() -> None:
    """What a normal start-up does and the launcher skipped: site-packages on sys.path, their
    .pth files, sitecustomize. Call it before importing anything outside the standard library.
    Nothing to do (and cheap) when the interpreter started with site, or after the first call."""
    global _site_deferred
    if _site_deferred:
        _site_deferred = False
        import site
        site.main()


# A shebang line is one interpreter path and one argument, at most 127 bytes read by older
# kernels, and no blanks in the path; otherwise a /bin/sh line re-executes the interpreter on
# the file (what pip's own launchers do), a Python string to Python.
_SHEBANG_MAX = 127


def package_root() -> str:
    """The directory holding the ctl package (the checkout for an editable install)."""
    import os
    return os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def script_text(entry: str, python: str | None = None, root: str | None = None, what: str = "") -> str:
    """A launcher calling `entry` ("module:function") with `python` (default: this one) -S, the
    ctl package found in `root` (default: this installation's) after the standard library, as
    pip's script finds it after site."""
    import shlex
    module, _, func = entry.partition(":")
    python, root = python or sys.executable, root or package_root()
    if any(c in python for c in " \t\n'\"\\") or len(f"#!{python} -S") > _SHEBANG_MAX:
        head = f"#!/bin/sh\n'''exec' {shlex.quote(python)} -S \"$0\" \"$@\"\n' '''\n"
    else:
        head = f"#!{python} -S\n"
    return (head + f"# {what or entry}: written by atomnet (ctl/launch.py). Python starts without site (-S):\n"
            "# the fast paths need only the standard library, the others call site.main() first.\n"
            "import sys\n"
            f"sys.path.append({root!r})\n"
            "from ctl.launch import run\n"
            f"sys.exit(run({module!r}, {func!r}))\n")


def write_script(path: str, text: str) -> None:
    """Atomically, mode 0755: a runtime or a shell starting it meanwhile runs the old file or the new one."""
    import os
    tmp = f"{os.path.dirname(path) or '.'}/.{os.path.basename(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def install_console_script(name: str, bin_dir: str | None = None) -> str:
    """Replace pip's console script `name` (in the bin dir of this interpreter) by a launcher of
    the same entry point, read from the installed distribution's metadata (pyproject's
    [project.scripts] stays the one place that names it)."""
    import os
    from importlib.metadata import entry_points
    found = [ep for ep in entry_points(group="console_scripts", name=name) if ep.dist and ep.dist.name == "atomnet"]
    if not found:
        raise SystemExit(f"no console script {name!r} installed for atomnet (pip install -e . first)")
    path = os.path.join(bin_dir or os.path.dirname(sys.executable), name)
    write_script(path, script_text(found[0].value, what=f"the `{name}` command"))
    return path


if __name__ == "__main__":   # make build: python -m ctl.launch atomnet
    for script in sys.argv[1:]:
        print(f"launcher: {install_console_script(script)}")
