"""Draw the ladder's Pareto plot from measured result files (later files win for the same config).

    python benchmarks/plot_ladder.py benchmarks/results/ladder-h100-2026-11-23-*.json \
        --out benchmarks/results/pareto-smollm2.png
"""

from __future__ import annotations

import argparse
import json

from anybit.report import pareto_front, pareto_plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = {}
    for path in args.results:
        for row in json.load(open(path)):
            rows[row["config"]["label"]] = row
    fp = rows.pop("fp", None)
    pareto_plot(list(rows.values()), args.out, fp["ppl"] if fp else None,
                "SmolLM2-135M, shakespeare held-out (shared/protocol.md)")
    from anybit.report import as_points
    for p in pareto_front([p for p in as_points(rows.values()) if not p["options"]]):
        print(f"pareto: {p['label']}: {p['bits']:.3f} bits, ppl {p['ppl']:.3f}")


if __name__ == "__main__":
    main()
