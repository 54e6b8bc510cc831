"""Per-layer share of p-values below 0.05 in lm-eval results files of calibrated routing (the first bin of
config.routing.diagnostics.per_layer[].pvalue_histogram), side by side, as a Markdown table.

    python scripts/calibration_tail_rates.py stock=results/calibration/stock.json routing=results/calibration/routing.json
"""

import json
import sys


def rates(path: str) -> tuple[list[float], dict]:
    with open(path) as f:
        routing = json.load(f)["config"]["routing"]
    layers = routing["diagnostics"]["per_layer"]
    return [x["pvalue_histogram"][0] / max(1, sum(x["pvalue_histogram"])) for x in layers], routing


def main(argv: list[str]) -> None:
    runs = {name: rates(path) for name, path in (a.split("=", 1) for a in argv)}
    names = list(runs)
    print("| layer | " + " | ".join(f"{n}: p < 0.05" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for layer in range(len(next(iter(runs.values()))[0])):
        print(f"| {layer} | " + " | ".join(f"{100 * runs[n][0][layer]:.1f} %" for n in names) + " |")
    for n in names:
        r, routing = runs[n]
        low = sum(1 for x in r if x < 0.035)
        print(f"\n{n}: {low} of {len(r)} layers below 3.5 %; mean experts per token "
              f"{routing['mean_experts_per_token']:.3f}; calibration {routing.get('calibration')}")


if __name__ == "__main__":
    main(sys.argv[1:])
