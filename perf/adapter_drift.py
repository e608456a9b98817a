"""How far each adapter of the triplet moves under `optim.frozen_adapters` skip (ours) and zero_grad (official).

The official trainer gives the adapters a step does not update zero gradients, so AdamW still moves them with
its momentum and decays them; ours leaves them untouched. Both runs here share the seed, hence the HMT draws,
the data and the noise. Per adapter: the displacement |w_T - w_0| (L2 over all its LoRA weights), the path length
sum_t |w_t - w_(t-1)| and the part of that path walked on steps that did not select the adapter; then the
zero_grad/skip ratio of the displacement. Appends to perf/results/adapter_drift.csv (device and git hash named).

    python perf/adapter_drift.py --steps 200                              # tiny preset
    python perf/adapter_drift.py --steps 400 --set model.preset=synth     # any config override
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import append_csv, device_name, git_hash  # noqa: E402
from dr_train.catalog import catalog_for  # noqa: E402
from dr_train.config import load_config  # noqa: E402
from dr_train.data.sources import resolve_dataset  # noqa: E402
from dr_train.distributed import Dist  # noqa: E402
from dr_train.model import load_mochi  # noqa: E402
from dr_train.trainer import RelationRun  # noqa: E402


def _flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in params])


def drift(mode: str, steps: int, relation: str, overrides: list[str], work: Path) -> list[dict]:
    cfg = load_config(None, [f"train.output_dir={work / mode}", f"train.max_steps={steps}",
                             f"optim.frozen_adapters={mode}", *overrides])
    rel = catalog_for(cfg)[relation]
    comps = load_mochi(cfg.model.preset, cfg.model.dtype, cfg.model.attention_backend,
                       max_text_tokens=cfg.model.max_text_tokens, parts=("transformer",))
    run = RelationRun(cfg, comps, rel, work / mode / relation, Dist(), resolve_dataset(cfg, [rel]))
    try:
        start = {a: _flat(ps) for a, ps in run.params_by_adapter.items()}
        last = dict(start)
        path = {a: 0.0 for a in start}
        frozen_path = {a: 0.0 for a in start}
        selected = {a: 0 for a in start}
        for _ in range(steps):
            record = run.train_step()
            for a, ps in run.params_by_adapter.items():
                now = _flat(ps)
                step = float((now - last[a]).norm())
                path[a] += step
                if a in record["adapters_updated"]:
                    selected[a] += 1
                else:
                    frozen_path[a] += step
                last[a] = now
        return [{"mode": mode, "adapter": a, "steps": steps, "steps_updated": selected[a],
                 "displacement": float((last[a] - start[a]).norm()), "path": path[a],
                 "path_while_not_selected": frozen_path[a]} for a in start]
    finally:
        run.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--relation", default="handshaking")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.OPTION=VALUE")
    ap.add_argument("--out", default=str(REPO / "perf" / "results" / "adapter_drift.csv"))
    args = ap.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for mode in ("skip", "zero_grad") for r in drift(mode, args.steps, args.relation, args.overrides,
                                                                   Path(tmp))]
    skip = {r["adapter"]: r for r in rows if r["mode"] == "skip"}
    preset = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("model.preset=")), "tiny")
    for r in rows:
        r["displacement_vs_skip"] = r["displacement"] / max(skip[r["adapter"]]["displacement"], 1e-12)
        r |= {"relation": args.relation, "preset": preset, "device": device_name(torch.device("cpu")),
              "git": git_hash(), "seconds": round(time.perf_counter() - started, 1)}
    print(f"{'adapter':10s} {'mode':10s} {'updated':>8s} {'displacement':>13s} {'path':>10s} "
          f"{'path (not selected)':>20s} {'x skip':>7s}")
    for r in rows:
        print(f"{r['adapter']:10s} {r['mode']:10s} {r['steps_updated']:8d} {r['displacement']:13.5f} "
              f"{r['path']:10.5f} {r['path_while_not_selected']:20.5f} {r['displacement_vs_skip']:7.3f}")
    append_csv(Path(args.out), rows)


if __name__ == "__main__":
    main()
