"""PNG chart: delivered GB/s and server CPU-seconds per GB by N, one bar per server.

matplotlib is imported here only, and this module only when --chart is given.
"""


def write_chart(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["workload"] == "throughput"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    servers = list(dict.fromkeys(name for r in rows for name, s in r["servers"].items()
                                 if isinstance(s, dict)))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, label in ((axes[0], "GB/s", "delivered GB/s (higher is better)"),
                                (axes[1], "CPU s/GB", "server CPU s per GB (lower is better)")):
        width = 0.8 / max(1, len(servers))
        for index, server in enumerate(servers):
            medians, low, high, labels = [], [], [], []
            for case in cases:
                summary = next((r["servers"].get(server) for r in rows
                                if r["case"] == case and r["metric"] == metric), None)
                if isinstance(summary, dict):
                    medians.append(summary["median"])
                    low.append(summary["median"] - summary["min"])
                    high.append(summary["max"] - summary["median"])
                    labels.append(f"{summary['median']:.3g}")
                else:  # a failed run has no figure: say so instead of drawing a zero
                    medians.append(0)
                    low.append(0)
                    high.append(0)
                    labels.append("failed" if summary else "n/a")
            positions = [c + (index - (len(servers) - 1) / 2) * width for c in range(len(cases))]
            bars = axis.bar(positions, medians, width, yerr=[low, high], capsize=3, label=server)
            axis.bar_label(bars, labels=labels, fontsize=7, padding=2, rotation=90)
        axis.set_xticks(range(len(cases)))
        axis.set_xticklabels(cases, fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", framealpha=0.9)
    for axis in axes:
        axis.set_ylim(top=axis.get_ylim()[1] * 1.2)  # room for the value labels
    figure.suptitle("relayd vs piping-server vs nginx (static sendfile ceiling), 1 producer -> N",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
