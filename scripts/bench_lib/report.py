"""The plain-text table and the JSON document of one benchmark invocation.

A section is one workload: its server columns, the ratios to show, and rows. A row is one
(case, metric): per server a summary {median, min, max, runs} or an error string.
Ratios divide medians: relayd / piping-server > 1 means relayd's figure is larger, so read
it with the row's `better` (higher for GB/s, lower for CPU s/GB and latencies).
"""
import json


class Section:
    def __init__(self, workload, title, servers, ratios):
        self.workload = workload
        self.title = title
        self.servers = list(servers)      # column names, in order
        self.ratios = list(ratios)        # (numerator, denominator) server names
        self.rows = []

    def add_row(self, case, metric, better, by_server):
        row = {"workload": self.workload, "case": case, "metric": metric, "better": better,
               "servers": by_server, "ratios": {}}
        for top, bottom in self.ratios:
            a, b = by_server.get(top), by_server.get(bottom)
            if isinstance(a, dict) and isinstance(b, dict) and b["median"]:
                row["ratios"][f"{top}/{bottom}"] = a["median"] / b["median"]
        self.rows.append(row)
        return row


def format_number(value):
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_cell(summary):
    if summary is None:
        return "n/a"
    if isinstance(summary, str):
        return "FAILED" if summary else "n/a"
    if len(summary["runs"]) == 1 or summary["min"] == summary["max"]:
        return format_number(summary["median"])
    return (f"{format_number(summary['median'])} "
            f"({format_number(summary['min'])}–{format_number(summary['max'])})")


def render_table(sections):
    """Every section as aligned plain text; cells are 'median (min–max)'."""
    out = []
    for section in sections:
        if not section.rows:
            continue
        ratio_names = [f"{a}/{b}" for a, b in section.ratios]
        header = ["case", "metric"] + section.servers + ratio_names
        lines = [header]
        for row in section.rows:
            cells = [row["case"], f"{row['metric']} ({row['better']} is better)"]
            cells += [format_cell(row["servers"].get(name)) for name in section.servers]
            cells += [format_number(row["ratios"].get(name)) + ("×" if name in row["ratios"]
                                                                 else "")
                      for name in ratio_names]
            lines.append(cells)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out.append(f"== {section.title}")
        for index, line in enumerate(lines):
            out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
            if index == 0:
                out.append("  ".join("-" * width for width in widths))
        out.append("")
    return "\n".join(out)


def to_document(sections, meta, failures, runs):
    return {"meta": meta, "failures": failures,
            "rows": [row for section in sections for row in section.rows], "runs": runs}


def write_json(path, document):
    with open(path, "w") as out:
        json.dump(document, out, indent=2)
        out.write("\n")
