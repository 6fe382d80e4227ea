"""Refresh medvl/ops/backend_order.json from a GPU run of `medvl bench --save RESULTS.json`.

    python bench/backend_order.py RESULTS.json [--table medvl/ops/backend_order.json]

For the device class of the run's last record (sm_XY), each op's GPU backends are ordered by the sum
of their medians over the shapes where both were measured, fastest first; the entry records those
sums and where they came from. Other classes' entries stay as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(REPOSITORY, "medvl", "ops", "backend_order.json")
GPU_BACKENDS = ("cuda", "triton")


def measured_orders(record: Dict, labels: Dict[str, str]) -> Dict[str, Dict]:
    """op -> {"order", "median_ms", "shapes"} from one saved run."""
    entries = {}
    for op, label in labels.items():
        medians: Dict[str, Dict[str, float]] = {}
        for row in record["results"]:
            backend = row["method"].removeprefix("medvl-")
            if row["op"] == label and backend in GPU_BACKENDS:
                medians.setdefault(row["shape"], {})[backend] = row["median_s"]
        shapes: List[str] = [shape for shape, times in medians.items() if len(times) == len(GPU_BACKENDS)]
        if not shapes:
            continue
        totals = {backend: round(1e3 * sum(medians[shape][backend] for shape in shapes), 3) for backend in GPU_BACKENDS}
        entries[op] = {"order": sorted(totals, key=totals.get), "median_ms": totals, "shapes": "; ".join(shapes)}
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a JSON file written by `medvl bench --save` on a GPU")
    parser.add_argument("--table", default=TABLE)
    args = parser.parse_args(argv)
    sys.path.insert(0, REPOSITORY)
    from medvl.bench import BENCH_LABELS

    with open(args.results, encoding="utf-8") as handle:
        record = json.load(handle)[-1]
    environment = record["environment"]
    device_class = environment.get("device_class")
    if not device_class:
        print(f"{args.results}: the last record has no device_class (not a GPU run?)", file=sys.stderr)
        return 1
    entries = measured_orders(record, BENCH_LABELS)
    if not entries:
        print(f"{args.results}: no op has both GPU backends measured", file=sys.stderr)
        return 1
    with open(args.table, encoding="utf-8") as handle:
        table = json.load(handle)
    previous = table["classes"].get(device_class, {})
    entry = {"source": f"{environment['device']}, medvl bench, commit {environment['git_sha']}, torch "
                       f"{environment['torch']}, triton {environment['triton']}"}
    entry.update({op: previous[op] for op in BENCH_LABELS if op in previous and op not in entries})
    entry.update(entries)
    table["classes"][device_class] = entry
    with open(args.table, "w", encoding="utf-8") as handle:
        json.dump(table, handle, indent=2)
        handle.write("\n")
    for op, measured in entries.items():
        print(f"{device_class} {op}: {' < '.join(measured['order'])} ({measured['median_ms']} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
