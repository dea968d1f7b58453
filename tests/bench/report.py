"""The benchmark's output: RESULTS.md (the table, every target met or missed, the
machine), results.json (every sample) and PNG charts (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path

from .harness import CLIENT_CPU, MET, NOISE, SERVER_CPU, Row, Series


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if unit == "s" and x < 0.1:
        return f"{x * 1000:.1f} ms"
    if abs(x) >= 1000:
        return f"{x:,.0f}".replace(",", " ")
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def cell(series: Series | None, unit: str) -> str:
    if series is None:
        return "—"
    if series.median is None:
        return f"{series.system}: no valid run"
    lo, hi = series.spread
    text = f"{series.system}: **{fmt(series.median, unit)}**"
    if len(series.valid) > 1:
        text += f" [{fmt(lo, unit)}–{fmt(hi, unit)}]"
    if series.flagged:
        text += f" ({len(series.flagged)} flagged)"
    return text


def ratio_text(r: float | None, row: Row) -> str:
    if r is None:
        return "—"
    text = f"{r:.2f}×" if r < 10 else f"{r:.0f}×"
    if row.unit == "s":   # times: say which way, in words
        text += f" ({1 / r:.1f}× faster)" if r < 1 else f" ({r:.1f}× slower)"
    return text


def verdict_cells(row: Row) -> tuple[str, str]:
    if not row.targets:
        return "—", "—"
    texts, results = [], []
    for t, verdict, x in row.verdicts():
        texts.append(t.text)
        if verdict is None:
            results.append("n/a")
        else:
            shown = (fmt(x, row.unit) if t.absolute else
                     f"{1 / x:.1f}× faster" if "faster" in t.text and x else ratio_text(x, row))
            results.append(f"met ({shown})" if verdict == MET else f"within noise ({shown})" if verdict == NOISE
                           else f"**missed** ({shown})")
    return "<br>".join(texts), "<br>".join(results)


def markdown(rows: list[Row], machine: dict, config: dict, facts: dict, command: str, charts: list[str],
             error: str | None = None) -> str:
    tools = ", ".join(f"{k} {v}" for k, v in machine["tools"].items())
    iperf = (f"iperf3 {config['iperf_bytes']}B per run" if config.get("iperf_bytes") else
             f"iperf3 {config['iperf_seconds']} s (+{config['iperf_omit']} s omitted)")
    out = [
        "# atomnet benchmarks",
        "",
        f"Produced by `{command}` on {machine['date']}.",
        "",
        f"- machine: Linux {machine['kernel']}, {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, {machine['os']}, Python {machine['python']}"
        + (", br_netfilter active" if machine.get("br_netfilter") else ""),
        f"- tools: {tools}",
        f"- runs: {config['reps']} repetitions per case, systems interleaved (A B A B ...); {iperf}, "
        f"sockperf {config['latency_seconds']} s, connection runs {config['crr_seconds']} s after "
        f"{config['crr_warmup']} s warm-up with {config['crr_procs']} client processes",
        "- cells: **median** [min–max] over the valid runs; ratio = atomnet / baseline (for times and "
        "latency lower is better, so a ratio below 1 is atomnet ahead)",
        f"- pinning: every client on CPU {CLIENT_CPU}, every server on CPU {SERVER_CPU}, for atomnet and its baseline alike (iperf3 -A, taskset)",
        "- result: met / **missed** by the medians, or *within noise* when atomnet's min–max range "
        "overlaps the goal's (the goal ratio times the baseline's min–max): this run cannot tell",
        "",
    ]
    if error:
        out += [f"**The run did not finish:** `{error}`. Rows below are what was measured before it stopped.", ""]
    out += ["| case | metric | atomnet | baseline | ratio | target | result |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        target, result = verdict_cells(r)
        ratio = ratio_text(r.ratio, r)
        out.append(f"| {r.case} | {r.metric} ({r.unit}) | {cell(r.atomnet, r.unit)} | {cell(r.baseline, r.unit)} "
                   f"| {ratio} | {target} | {result} |")
    notes = [f"- **{r.case}, {r.metric}:** {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "## Notes per row", ""] + notes
    flagged, seen = [], set()
    for r in rows:
        for s in (r.atomnet, r.baseline):
            for x in (s.flagged if s else []):
                if id(x) not in seen:
                    seen.add(id(x))
                    flagged.append((r, s, x))
    out += ["", "## Runs that were not measurements (flagged, retried at once, never counted)", ""]
    if flagged:
        out += [f"- {r.case} / {s.system}: {fmt(x.value)} {r.unit} — {x.flagged}" for r, s, x in flagged]
    else:
        out.append("- none: no connection run saw a SYN retransmission or a failed connection, no tool failed")
    if facts:
        out += ["", "## Other figures", ""]
        for key, value in facts.items():
            out.append(f"- {key}: {json.dumps(value, default=str)}")
    if charts:
        out += ["", "## Charts", ""] + [f"![{c}]({c})" for c in charts]
    out += ["", METHOD]
    return "\n".join(out) + "\n"


METHOD = """## How each case is measured

- **Topology**: every node, pod and host is a network namespace made by the benchmark on
  the e2e rig (tests/e2e/rig.py); nodes share an underlay bridge in its own namespace.
  atomnet nodes run the daemon; the baselines are built the way their systems build them
  (tests/bench/topo.py, tests/bench/rules.py): routed veth (a /32 route per pod, no BPF, no
  netfilter), kube-proxy iptables mode (KUBE-SERVICES / KUBE-SVC-* / KUBE-SEP-* with
  `statistic --mode random`, KUBE-MARK-MASQ, KUBE-POSTROUTING, KUBE-FORWARD), flannel's vxlan
  backend with the bridge CNI plugin (flannel.1, cni0, FDB, permanent neighbour, onlink
  route), Docker's bridge network (docker0, DOCKER chain DNAT from PREROUTING and OUTPUT,
  MASQUERADE, FORWARD policy DROP with Docker's accept rules).
- **iptables** is iptables-legacy (x_tables). While building the benchmark, iptables-nft
  1.8.9 (Debian 12's default) took about 28 s to restore 10 000 one-endpoint services on this
  machine (legacy: 0.5 s) and more than 5 minutes for 10 000 × 10: legacy is the faster,
  kinder baseline for kube-proxy, and what the figures in DESIGN.md used
  (`python -m tests.bench.run --iptables nft` runs everything with nft instead).
- **While a dataplane is measured** the atomnet daemons are paused (SIGSTOP): the programs do
  all the packet work; the daemon's periodic full resync would otherwise compete for the
  CPUs. That cost has rows of its own: the daemon's idle CPU, and connections/s at the
  largest service count with the daemon running.
- **The underlay bridge** (standing for the physical switch) has bridge-nf-call-iptables=0;
  bridges inside nodes (flannel's cni0, docker0) keep this machine's default (br_netfilter
  is active here), as Kubernetes and Docker require it.
- **Throughput**: iperf3, one TCP stream, receiver's rate after the omitted first second.
- **Latency**: sockperf ping-pong over one TCP connection, 64-byte messages; p50 of the half
  round trip. sockperf rather than qperf: it gives the distribution (p50, p99), not only a
  mean that a few scheduler stalls on 2 busy CPUs would drag; both ends busy-poll
  (`--nonblocked`), because on this VM a vCPU that went idle takes ~20 µs to wake, twice per
  round trip, the same for every system: blocking sockets measured ~41 µs p50 on a bare veth
  pair, busy-polling ~2.8 µs.
- **New connections/s**: tests/bench/crr.py, netperf TCP_CRR style: connect, one HTTP request,
  the whole response, close with RST (SO_LINGER 0), in several processes at once; nginx with
  one worker answers. A run whose client namespace counted any SYN retransmission
  (TcpExt TCPSynRetrans) or a failed connection is flagged, retried and never counted.
  The client is Python: it spends CPU on the same 2 CPUs as the server and the path, so
  differences between paths show diluted, not amplified.
- **Control plane**: atomnet on a fresh node (own store, pins, daemon) per repetition:
  `atomnet apply -f` of all services in one transaction, timed from the command's start to the
  daemon's `reconciled` log event that carries the change; kube-proxy: one
  `iptables-restore --noflush --counters` of the full rule set into a fresh namespace, and
  for one change another full restore (what kube-proxy does on each sync).
"""


# ------------------------------------------------------------------ charts

def charts(series: dict, outdir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def err(d: dict) -> tuple[float, list[float]]:
        med = d["median"] or 0.0
        lo, hi = d["min_max"] or (med, med)
        return med, [med - lo, hi - med]

    def bars(path: str, title: str, ylabel: str, groups: list[tuple[str, dict]], log: bool = False,
             lines: tuple[tuple[float, str], ...] = ()):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        x, pos, labels = 0.0, [], []
        for group, systems in groups:
            for name, d in systems.items():
                med, e = err(d)
                ax.bar(x, med, yerr=[[e[0]], [e[1]]], capsize=4,
                       color="#1f77b4" if name.startswith("atomnet") else "#ff7f0e")
                ax.annotate(f"{med:.3g}", (x, med + e[1]), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8)
                pos.append(x)
                labels.append(f"{group}\n{name}")
                x += 1
            x += 0.5
        ax.set_xticks(pos, labels, fontsize=7)
        ax.set_ylabel(ylabel + " (median, min–max)")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        for y, text in lines:
            ax.axhline(y, color="#2ca02c", linestyle="--", linewidth=1)
            ax.annotate(text, (pos[-1] + 0.4, y), xytext=(0, 2), textcoords="offset points", ha="right",
                        va="bottom", fontsize=8, color="#2ca02c")
        fig.tight_layout()
        fig.savefig(outdir / path, dpi=110)
        plt.close(fig)
        made.append(path)

    if "connections_vs_services" in series:
        data = series["connections_vs_services"]
        counts = sorted(data, key=int)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, style in (("atomnet", "o-"), ("kube-proxy", "s-"), ("routed pod→pod", "^--")):
            meds, errs = [], [[], []]
            for n in counts:
                med, e = err(data[n][name])
                meds.append(med)
                errs[0].append(e[0])
                errs[1].append(e[1])
            label = {"atomnet": "atomnet (tc DNAT)", "kube-proxy": "kube-proxy iptables",
                     "routed pod→pod": "kernel-routed pod → pod (no service)"}[name]
            ax.errorbar([int(n) for n in counts], meds, yerr=errs, fmt=style, capsize=4, label=label)
        last = counts[-1]
        if "atomnet, daemon running" in data[last]:
            med, e = err(data[last]["atomnet, daemon running"])
            ax.errorbar([int(last)], [med], yerr=[[e[0]], [e[1]]], fmt="x", capsize=4, color="#1f77b4",
                        label="atomnet with its daemon running")
        ax.set_xscale("log")
        ax.set_xticks([int(n) for n in counts], [f"{int(n):,}".replace(",", " ") for n in counts])
        ax.minorticks_off()
        ax.set_xlabel("services (log scale)")
        ax.set_ylabel("new connections/s (median, min–max)")
        ax.set_title("pod → service: new connections/s vs number of services")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(outdir / "connections_vs_services.png", dpi=110)
        plt.close(fig)
        made.append("connections_vs_services.png")

    groups = []
    if "throughput_same_node" in series:
        t = series["throughput_same_node"]
        groups += [("same node", {k: t[k] for k in ("atomnet", "routed veth")}),
                   ("service", {k: t[k] for k in ("atomnet via VIP", "kube-proxy via VIP")})]
    if "throughput_cross_node" in series:
        groups.append(("cross node", series["throughput_cross_node"]))
    if groups:
        bars("throughput.png", "pod → pod / service throughput (iperf3, 1 stream)", "Gbit/s", groups)

    groups = [(g, series[k]) for g, k in (("same node", "latency_same_node"), ("cross node", "latency_cross_node"))
              if k in series]
    if groups:
        bars("latency.png", "latency: p50 half round trip (sockperf TCP, 64 B, busy-poll)", "µs", groups)

    if "host_port" in series:
        bars("host_port.png", "host port from outside: new connections/s", "conn/s",
             [("host port", series["host_port"])])

    if "control_plane" in series:
        cp = series["control_plane"]
        bars("control_plane.png", "control plane: program every service, change one", "seconds",
             [("program all", {"atomnet": cp["atomnet program"], "iptables-restore": cp["iptables program"]}),
              ("change one (p50)", {"atomnet": cp["atomnet change p50"], "iptables-restore": cp["iptables change"]})],
             lines=((2.0, "target: program all < 2 s"),))
    return made


def write(outdir: Path, rows: list[Row], series: dict, machine: dict, config: dict, facts: dict, command: str,
          error: str | None = None) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    made = charts(series, outdir)
    (outdir / "results.json").write_text(json.dumps(
        {"machine": machine, "config": config, "command": command, "error": error, "facts": facts,
         "rows": [r.to_dict() for r in rows], "series": series}, indent=1, default=str))
    path = outdir / "RESULTS.md"
    path.write_text(markdown(rows, machine, config, facts, command, made, error))
    return path
