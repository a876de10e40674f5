"""Tables, the comparison of all defences against none, and the plot of the extraction run.

``summarize`` compares the settings ``all`` and ``off`` at the largest budget against the
targets of the benchmark: every attacker flagged within ``FLAG_WITHIN`` queries, and its clone
fidelity down by ``FIDELITY_DROP`` or its simulated time to the same number of answers up by
``SLOWDOWN``; the replay clients' accuracy within ``HONEST_CHANGE`` of the teacher's; no
honest client blocked; no decoy in an honest client's tool calls.
"""

from __future__ import annotations

from pathlib import Path

FLAG_WITHIN = 1000  # queries
FIDELITY_DROP = 0.15  # share of the test split, 15 points
SLOWDOWN = 10.0  # times the simulated seconds without defences
HONEST_CHANGE = 0.005  # share of the replay clients' queries, 0.5 points


def format_cell(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def decoy_share(decoy_calls: int, tool_calls: int) -> str:
    if not tool_calls:
        return "-"
    return f"{decoy_calls / tool_calls:.1%} ({decoy_calls}/{tool_calls})"


def summarize(results: list[dict], budget: int) -> dict | None:
    """Return the comparison of the settings ``all`` and ``off`` at ``budget``, or None
    unless both ran."""
    by_setting = {result["setting"]: result for result in results}
    if "off" not in by_setting or "all" not in by_setting:
        return None
    defended = {
        row["attacker"]: row for row in by_setting["all"]["attackers"] if row["budget"] == budget
    }
    attackers = []
    for plain in by_setting["off"]["attackers"]:
        if plain["budget"] != budget:
            continue
        row = defended[plain["attacker"]]
        # Without defences an attacker gets its whole budget, or its whole source if smaller.
        target = plain["answered"]
        reached = row["answered"] >= target
        slowdown = (
            row["simulated_seconds"] / plain["simulated_seconds"]
            if reached and plain["simulated_seconds"]
            else None
        )
        change = row["fidelity"] - plain["fidelity"] if row.get("fidelity") is not None else None
        flagged = row["degraded_after"]
        slower = not reached or (slowdown is not None and slowdown >= SLOWDOWN)
        worse = change is not None and -change >= FIDELITY_DROP
        attackers.append(
            {
                "attacker": plain["attacker"],
                "target": target,
                "answered": row["answered"],
                "reached": reached,
                "flagged_after": flagged,
                "blocked_after": row["blocked_after"] or row["block_tier_after"],
                "fidelity_off": plain.get("fidelity"),
                "fidelity_all": row.get("fidelity"),
                "fidelity_change": change,
                "seconds_off": plain["simulated_seconds"],
                "seconds_all": row["simulated_seconds"],
                "slowdown": slowdown,
                "tool_calls": row["tool_calls"],
                "decoy_calls": row["decoy_calls"],
                "flagged_in_time": flagged is not None and flagged <= FLAG_WITHIN,
                "fidelity_or_time": worse or slower,
            }
        )

    honest = by_setting["all"]["honest"]
    replay = next(group for group in honest if group["group"] == "replay")
    blocked = sum(group["clients_blocked"] for group in honest)
    clients = sum(group["clients"] for group in honest)
    honest_calls = sum(group["tool_calls"] for group in honest)
    honest_decoys = sum(group["decoy_calls"] for group in honest)
    checks = [
        {
            "check": f"every attacker flagged within {FLAG_WITHIN:,} queries",
            "holds": all(entry["flagged_in_time"] for entry in attackers),
            "figures": ", ".join(
                f"{entry['attacker']} {format_cell(entry['flagged_after'], 'd')}"
                for entry in attackers
            ),
        },
        {
            "check": f"clone fidelity down {100 * FIDELITY_DROP:.0f} points or simulated time "
            f"{SLOWDOWN:g} times longer, per attacker",
            "holds": all(entry["fidelity_or_time"] for entry in attackers),
            "figures": ", ".join(
                f"{entry['attacker']} {describe_time(entry)}" for entry in attackers
            ),
        },
        {
            "check": f"replay clients' accuracy within {100 * HONEST_CHANGE:.1f} points",
            "holds": abs(replay["accuracy_change"]) <= HONEST_CHANGE,
            "figures": f"{100 * replay['accuracy_change']:+.2f} points",
        },
        {
            "check": "no honest client blocked",
            "holds": blocked == 0,
            "figures": f"{blocked}/{clients} blocked",
        },
        {
            "check": "no decoy among the honest clients' tool calls",
            "holds": honest_decoys == 0,
            "figures": f"{honest_decoys} of {honest_calls} tool calls",
        },
    ]
    return {"budget": budget, "attackers": attackers, "checks": checks}


def describe_time(entry: dict) -> str:
    if not entry["reached"]:
        return (
            f"never reached {entry['target']:,} answers (blocked after "
            f"{entry['answered']:,} at {entry['seconds_all']:.0f} s)"
        )
    seconds = f"{entry['seconds_off']:.0f} s -> {entry['seconds_all']:.0f} s"
    return f"{entry['slowdown']:.1f}x ({seconds})"


def markdown_report(results: list[dict], summary: dict | None) -> str:
    """Return the attacker table, the honest table and the comparison, in Markdown."""
    lines = attacker_table(results) + [""] + honest_table(results)
    if summary is not None:
        lines += [""] + summary_table(summary)
    return "\n".join(lines) + "\n"


def attacker_table(results: list[dict]) -> list[str]:
    lines = [
        "| setting | attacker | budget | answered | fidelity | accuracy | simulated s | "
        "429s | degraded after | blocked after | max risk | watermark p (marked) | "
        "decoy share (calls) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for row in result["attackers"]:
            watermark = row.get("watermark") or {}
            p_value = watermark.get("p_value")
            p_text = (
                "off"
                if watermark.get("note") == "watermark off"
                else (f"{format_cell(p_value, '.2e')} ({watermark.get('marked', 0)})")
            )
            blocked = (
                row["blocked_after"]
                if row["blocked_after"] is not None
                else (row["block_tier_after"])
            )
            lines.append(
                f"| {row['setting']} | {row['attacker']} | {row['budget']} | "
                f"{row['answered']} | {format_cell(row.get('fidelity'), '.1%')} | "
                f"{format_cell(row.get('accuracy'), '.1%')} | "
                f"{format_cell(row['simulated_seconds'], '.0f')} | {row['rejected_429']} | "
                f"{format_cell(row['degraded_after'], 'd')} | {format_cell(blocked, 'd')} | "
                f"{format_cell(row['max_risk'], '.2f')} | {p_text} | "
                f"{decoy_share(row['decoy_calls'], row['tool_calls'])} |"
            )
    return lines


def honest_table(results: list[dict]) -> list[str]:
    lines = [
        "| setting | honest group | clients | queries | teacher top-1 accuracy | "
        "answered accuracy | change (points) | flagged | blocked | 429s | max risk | "
        "decoy share (calls) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for group in result["honest"]:
            clients = group["clients"]
            lines.append(
                f"| {result['setting']} | {group['group']} | {clients} | {group['queries']} | "
                f"{group['teacher_accuracy']:.2%} | {group['answered_accuracy']:.2%} | "
                f"{100 * group['accuracy_change']:+.2f} | "
                f"{group['clients_flagged']}/{clients} | {group['clients_blocked']}/{clients} | "
                f"{group['rejected_429']} | {format_cell(group['max_risk'], '.2f')} | "
                f"{decoy_share(group['decoy_calls'], group['tool_calls'])} |"
            )
    return lines


def summary_table(summary: dict) -> list[str]:
    lines = [
        f"All defences (`all`) against none (`off`) at the budget of {summary['budget']:,}:",
        "",
        "| attacker | flagged after | fidelity off | fidelity all | change (points) | "
        "simulated s off | simulated s all | decoy share (calls) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in summary["attackers"]:
        change = entry["fidelity_change"]
        lines.append(
            f"| {entry['attacker']} | {format_cell(entry['flagged_after'], 'd')} | "
            f"{format_cell(entry['fidelity_off'], '.1%')} | "
            f"{format_cell(entry['fidelity_all'], '.1%')} | "
            f"{format_cell(None if change is None else 100 * change, '+.1f')} | "
            f"{entry['seconds_off']:.0f} | {describe_time(entry)} | "
            f"{decoy_share(entry['decoy_calls'], entry['tool_calls'])} |"
        )
    lines.append("")
    for check in summary["checks"]:
        verdict = "holds" if check["holds"] else "does not hold"
        lines.append(f"- {check['check']}: {verdict} ({check['figures']})")
    return lines


def plot_fidelity(results: list[dict], path: Path) -> None:
    """Draw each attacker's clone fidelity against the simulated seconds it took.

    Each setting is a line with one point per budget. A cross marks a blocked attacker.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attackers = list(dict.fromkeys(row["attacker"] for row in results[0]["attackers"]))
    columns = 2
    rows = -(-len(attackers) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(12, 4.2 * rows), squeeze=False)
    markers = "osD^v<>ph*"
    for index, attacker in enumerate(attackers):
        axis = axes[index // columns][index % columns]
        for order, result in enumerate(results):
            points = [
                row
                for row in result["attackers"]
                if row["attacker"] == attacker and row.get("fidelity") is not None
            ]
            # Budgets beyond what the attacker got repeat its last point.
            unique = list(
                {(row["answered"], row["simulated_seconds"]): row for row in points}.values()
            )
            seconds = [row["simulated_seconds"] for row in unique]
            fidelity = [100 * row["fidelity"] for row in unique]
            (line,) = axis.plot(
                seconds,
                fidelity,
                marker=markers[order % len(markers)],
                label=result["setting"],
                alpha=0.85,
            )
            if unique and (
                unique[-1]["blocked_after"] is not None
                or unique[-1]["block_tier_after"] is not None
            ):
                axis.plot(
                    seconds[-1],
                    fidelity[-1],
                    marker="X",
                    markersize=12,
                    color=line.get_color(),
                    linestyle="none",
                )
        axis.set_xscale("log")
        axis.set_ylim(bottom=0)
        axis.set_title(f"attacker: {attacker}")
        axis.set_xlabel("simulated seconds to the budget's last answer (log)")
        axis.set_ylabel("clone fidelity to the teacher (%)")
        axis.grid(True, which="both", alpha=0.3)
    for index in range(len(attackers), rows * columns):
        axes[index // columns][index % columns].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.suptitle(
        "Clone fidelity against the attacker's simulated time, per defence "
        "setting (points: budgets; X: blocked)"
    )
    figure.tight_layout(rect=(0, 0.04, 1, 0.97))
    figure.savefig(path, dpi=110)
    plt.close(figure)
