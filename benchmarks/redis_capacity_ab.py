"""Pool the by-reference fits of several `benchmarks/redis_capacity.py` result files, one group per code version.

    python benchmarks/redis_capacity_ab.py --job-size 8 \
        before=benchmarks/results/redis_capacity_ab_20261207/at_c14b074/*repeats7* \
        after=benchmarks/results/redis_capacity_ab_20261207/at_9e2f776/*

Each file's reference row holds its fit pairs (a run at --size and one at --fit-size, same images). On a
noisy VM one file's median of a few pairs moves by tens of percent from run to run; runs of two versions
taken in turn, pooled here, compare them over the same stretch of the host's load. Per group: the number
of pairs, the median per-image fit and its quartiles (redis_capacity.py's own estimate, over all pairs),
a least-squares fit of every run at once (cpu_ms = per_image_ms * images + per_s_ms * wall_s), and the
median raw main-thread CPU per image of the faster runs (per-second costs included, no fit). Nothing is
measured here; it reads the JSON files only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Pair:
    """One fit pair of a redis_capacity run: walls (s) and main-thread CPU (ms) of the slow and fast runs."""

    images: int
    slow_wall_s: float
    fast_wall_s: float
    slow_cpu_ms: float
    fast_cpu_ms: float

    @property
    def per_image_ms(self) -> float:
        """redis_capacity.per_image_fit's per-image cost of this pair."""
        d_wall = self.slow_wall_s - self.fast_wall_s
        return (self.fast_cpu_ms * self.slow_wall_s - self.slow_cpu_ms * self.fast_wall_s) / (self.images * d_wall)


def pairs(path: Path, job_size: int) -> list[Pair]:
    """The fit pairs of the reference row of this job size in one result file."""
    result = json.loads(path.read_text())
    found = []
    for row in result["runs"]:
        if row["mode"] == "reference" and row["job_size"] == job_size:
            for fit in row.get("fits", []):
                (slow_wall, fast_wall), (slow_cpu, fast_cpu) = fit["walls_s"], fit["cpu_ms"]
                found.append(Pair(row["images"], slow_wall, fast_wall, slow_cpu, fast_cpu))
    return found


def summary(group: list[Pair]) -> dict[str, float]:
    """Pooled estimates of one group's pairs (microseconds per image, ms per second)."""
    fits = np.array([pair.per_image_ms for pair in group]) * 1000
    runs = [(p.images, p.slow_wall_s, p.slow_cpu_ms) for p in group] + [(p.images, p.fast_wall_s, p.fast_cpu_ms)
                                                                          for p in group]
    (per_image, per_s), *_ = np.linalg.lstsq(np.array([[n, wall] for n, wall, _ in runs], dtype=float),
                                             np.array([cpu for *_, cpu in runs]), rcond=None)
    return {"pairs": len(group), "median_us": float(np.median(fits)), "q1_us": float(np.percentile(fits, 25)),
            "q3_us": float(np.percentile(fits, 75)), "least_squares_us": float(per_image) * 1000,
            "least_squares_per_s_ms": float(per_s),
            "fast_raw_median_us": statistics.median(p.fast_cpu_ms / p.images * 1000 for p in group)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="NAME=FILE[,FILE...] (a shell glob expands to several arguments: "
                                                  "files after a NAME= argument join its group)")
    parser.add_argument("--job-size", type=int, default=8)
    args = parser.parse_args()
    groups: dict[str, list[Path]] = {}
    name = None
    for item in args.groups:
        if "=" in item:
            name, files = item.split("=", 1)
            groups.setdefault(name, []).extend(Path(f) for f in files.split(",") if f)  # a NAME again adds to it
        elif name is not None:
            groups[name].append(Path(item))
        else:
            parser.error(f"{item}: a file before any NAME=")
    for name, files in groups.items():
        found = [pair for path in files for pair in pairs(path, args.job_size)]
        if not found:
            print(f"{name}: no reference fits of jobs of {args.job_size} in {len(files)} files")
            continue
        s = summary(found)
        print(f"{name}: {len(files)} files, {s['pairs']} pairs; per image {s['median_us']:.1f} us median "
              f"(quartiles {s['q1_us']:.1f}-{s['q3_us']:.1f}; {1e6 / s['median_us']:,.0f} img/s), least squares "
              f"{s['least_squares_us']:.1f} us + {s['least_squares_per_s_ms']:.2f} ms/s; faster runs raw "
              f"{s['fast_raw_median_us']:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
