"""Scheduling efficiency of the Ray batch runner: makespan of N relations on K slots vs their single-run times.

Runs the same N relations twice through dr_train.orchestrate.run_relations on one Ray cluster: first one at a
time (--max-concurrent 1), which gives each relation's single-run time T_i (its wall time: the task's start to its
end, model load, checkpoints and LoRA export included), then with K = --slots at once, whose makespan M (first
submission to the last relation done) is compared with the ideal sum(T_i) / K:

    efficiency = (sum(T_i) / K) / M

It splits exactly into what the scheduler controls and what the hardware does, with C_i the relations' wall
times in the concurrent run:

    efficiency  = utilization x speed
    utilization = sum(C_i) / (K * M)    the share of slot-time spent training relations (idle slots, dispatch gaps
                                        and the tail where fewer than K relations are left lower it)
    speed       = sum(T_i) / sum(C_i)   how fast a relation trains beside others vs alone (< 1 when slots share
                                        cores, memory bandwidth or a GPU)

and `packing` = (sum(T_i) / K) / LPT, where LPT is the makespan of the longest-first schedule of the T_i on K
slots, is the best whole relations can do (< 1 when N is not a multiple of K or the times differ). A slot is the
resources of one relation (--cpus-per-relation, --gpus-per-relation); on a CPU machine give it whole cores
(torch uses that many threads).

Before timing, K worker processes import torch and the trainer once (--no-warmup to skip): a one-off ~5 s per
process that is nothing against hours of training on a cluster but would dominate the tiny preset here.

Output: a row appended to <out>/bench_ray.csv (device, versions, git hash, settings, sum/max of T_i, M, LPT,
efficiency, utilization, speed, packing, the T_i and concurrent wall times as JSON) and the printed summary.

    python perf/bench_ray.py --relations handshaking,hugging,kicking,pushing --slots 2 --max-steps 300 --out /tmp/b
    python perf/bench_ray.py --address auto --gpus-per-relation 1 --slots 8 --relations all --max-steps 100
"""
from __future__ import annotations

import argparse
import heapq
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import append_csv, git_hash  # noqa: E402

from dr_train.catalog import catalog_for, select_relations  # noqa: E402
from dr_train.config import load_config  # noqa: E402
from dr_train.data.sources import resolve_dataset  # noqa: E402
from dr_train.orchestrate import RayOptions, run_relations  # noqa: E402
from dr_train.orchestrate.run import connect  # noqa: E402


def lpt_makespan(times: list[float], slots: int) -> float:
    """Makespan of the longest-processing-time-first list schedule of `times` on `slots` identical slots."""
    loads = [0.0] * max(1, slots)
    heapq.heapify(loads)
    for t in sorted(times, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + t)
    return max(loads)


def _warm(n: int, cpus: float, gpus: float) -> None:
    """Start n worker processes that have imported torch and the trainer (Ray reuses them for the relations)."""
    import ray  # deferred: ray is an optional dependency

    def load() -> int:
        import os  # runs in the Ray worker: these imports are the point (warm the process)

        import dr_train.trainer  # noqa: F401

        time.sleep(0.5)                    # hold the slot so the n tasks land on n different processes
        return os.getpid()

    pids = ray.get([ray.remote(load).options(num_cpus=cpus, num_gpus=gpus).remote() for _ in range(n)])
    print(f"warmed {len(set(pids))} worker process(es)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--relations", default="handshaking,hugging,kicking,pushing", help="train.relations")
    p.add_argument("--slots", type=int, default=2, help="relations at once in the concurrent run (K)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--cpus-per-relation", type=float, default=1.0)
    p.add_argument("--gpus-per-relation", type=float, default=-1.0)
    p.add_argument("--address", default="", help="an existing Ray cluster (default: a local one)")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs of the local cluster (0 = this machine's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                   help="trainer config overrides, as launch/train.py")
    p.add_argument("--work", type=Path, help="folder for the two runs (default: a temporary folder, removed)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    a = p.parse_args(argv)
    if a.slots < 1:
        p.error("--slots must be >= 1")
    cfg = load_config(None, [f"train.relations={a.relations}", f"train.max_steps={a.max_steps}",
                             f"train.checkpoint_every={a.checkpoint_every}", "model.preset=tiny", *a.set])
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_ray_"))
    common = dict(address=a.address, num_cpus=a.num_cpus, cpus_per_relation=a.cpus_per_relation,
                  gpus_per_relation=a.gpus_per_relation, max_retries=0, live="off")
    try:
        import ray  # deferred: ray is an optional dependency

        connect(RayOptions(**common))
        if cfg.data.source == "synthetic":               # generate the data before anything is timed
            cfg.data.source = str(resolve_dataset(cfg, select_relations(cfg.train.relations,
                                                                        catalog_for(cfg))))
        if not a.no_warmup:
            gpus = a.gpus_per_relation
            if gpus < 0:
                gpus = 1.0 if ray.cluster_resources().get("GPU") else 0.0
            _warm(a.slots, a.cpus_per_relation, min(gpus, 1.0))
        with open(work / "sequential.log", "w") as log:
            single = run_relations(cfg, RayOptions(storage=str(work / "sequential"), max_concurrent=1, **common), log)
        with open(work / "concurrent.log", "w") as log:
            conc = run_relations(cfg, RayOptions(storage=str(work / "concurrent"), max_concurrent=a.slots, **common),
                                 log)
        failed = [r.relation for r in single.results + conc.results if r.status != "finished"]
        if failed:
            print(f"relations did not finish: {failed}; see {work}/*.log", file=sys.stderr)
            return 1
        times = {r.relation: r.wall_seconds for r in single.results}
        total, longest = sum(times.values()), max(times.values())
        busy = sum(r.wall_seconds for r in conc.results)
        ideal, lpt, makespan = total / a.slots, lpt_makespan(list(times.values()), a.slots), conc.makespan_seconds
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
               "device": f"cpu ({platform.processor() or platform.machine()})" if not conc.resources.gpus else
               "gpu", "cluster_cpus": ray.cluster_resources().get("CPU", 0),
               "cluster_gpus": ray.cluster_resources().get("GPU", 0), "git": git_hash(), "ray": ray.__version__,
               "python": platform.python_version(), "relations": len(times), "max_steps": a.max_steps,
               "slots": a.slots, "cpus_per_relation": conc.resources.cpus, "gpus_per_relation": conc.resources.gpus,
               "sum_single_s": round(total, 2), "max_single_s": round(longest, 2), "ideal_s": round(ideal, 2),
               "lpt_s": round(lpt, 2), "makespan_s": round(makespan, 2), "efficiency": round(ideal / makespan, 3),
               "utilization": round(busy / (a.slots * makespan), 3), "speed": round(total / busy, 3),
               "packing": round(ideal / lpt, 3),
               "single_s": json.dumps({k: round(v, 2) for k, v in times.items()}),
               "concurrent_wall_s": json.dumps({r.relation: round(r.wall_seconds, 2) for r in conc.results}),
               "warmup": not a.no_warmup}
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(times)} relations x {a.max_steps} steps: single-run times {row['single_s']} (sum {total:.1f} s)")
    print(f"{a.slots} slots: makespan {makespan:.1f} s vs ideal sum/slots {ideal:.1f} s (LPT schedule {lpt:.1f} s) "
          f"-> efficiency {ideal / makespan:.2f} = utilization {row['utilization']:.2f} x speed {row['speed']:.2f} "
          f"(packing bound {ideal / lpt:.2f})")
    path = append_csv(a.out / "bench_ray.csv", [row])
    print(f"appended a row to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
