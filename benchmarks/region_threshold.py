"""RegionE's similarity threshold on training edits (not the held-out ones the bench reports on).

For each threshold, on `--edits` training edits of the local kinds (and, apart, background
edits), edited one at a time (a batch computes as many tokens per image as its largest edit
needs): the partition's recall and IoU against the ground-truth masks and against the pixels
the full edit changed (a missed edited token is frozen wrong: recall first; an added object may
go anywhere, so against the ground truth an add can read as missed), the share of tokens edited
and of tokens computed, and PSNR against the same edits at full compute.

    python benchmarks/region_threshold.py --out benchmarks/results/region_threshold_shapes-edit.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

import tempocache as tc
from tempocache.eval.edit_quality import partition_scores
from tempocache.eval.fidelity import fidelity
from tempocache.models import REGION, attached
from tempocache.reference.edits import KINDS, sample_edit, render_edit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=24, help="training edits of the local kinds, the kinds in turn")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pipe = tc.load_pipeline("shapes-edit", args.device)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(12345)
    local = [k for k in KINDS if k != "background"]
    groups = {"local": [sample_edit(rng, "train", local[i % len(local)]) for i in range(args.edits)],
              "background": [sample_edit(rng, "train", "background") for _ in range(max(2, args.edits // 4))]}
    result = {"model": "shapes-edit", "date": datetime.date.today().isoformat(), "device": args.device,
              "command": f"python benchmarks/region_threshold.py --edits {args.edits}", "groups": {}}
    for name, edits in groups.items():
        sources, _, masks = (torch.stack(t) for t in zip(*(render_edit(e) for e in edits)))
        instructions = [e.instruction for e in edits]

        def one_at_a_time() -> np.ndarray:
            return np.stack([tc.edit(source, instruction, pipe=pipe) for source, instruction in zip(sources, instructions)])

        full = one_at_a_time()
        full_edit = (torch.from_numpy(full).permute(0, 3, 1, 2) - sources).abs().amax(1) > 0.1  # what it changed
        rows = []
        for threshold in args.thresholds:
            with tc.enabled(pipe, tc.RegionE(threshold=threshold)):
                out = one_at_a_time()
                stats, partition = tc.stats(pipe), torch.cat(attached(pipe, REGION).partitions)
            row = {"threshold": threshold, "psnr_vs_full": fidelity(out[:, None], full[:, None])["psnr"],
                   "compute_fraction": stats["compute_fraction"], "global_fallbacks": stats["global_fallbacks"]}
            for label, truth in (("partition", masks), ("partition_vs_full_edit", full_edit)):
                scores = partition_scores(partition, truth)
                row.update({f"{label}_{k}": float(np.mean([s[k] for s in scores])) for k in ("recall", "iou")})
                row[f"{label}_recall_min"] = min(s["recall"] for s in scores)
            row["edited_fraction"] = float(np.mean([s["edited_fraction"] for s in scores]))
            rows.append(row)
            print(name, json.dumps(rows[-1]), flush=True)
        result["groups"][name] = {"edits": len(edits), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
