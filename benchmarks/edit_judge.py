"""The edit judge's ceiling and floor: ShapesWorld's ground-truth targets and the unedited sources, judged as edits.

    python benchmarks/edit_judge.py --out benchmarks/results/edit_judge.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

from tempocache.eval.edit_quality import judge_edits
from tempocache.eval.evaluator import load_evaluator
from tempocache.reference.edits import KINDS, held_out_edits, render_edit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=200, help="held-out edits, the kinds in turn")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    evaluator, edits = load_evaluator(), held_out_edits(args.edits)
    sources, targets, _ = (torch.stack(t) for t in zip(*(render_edit(e) for e in edits)))
    result = {"date": datetime.date.today().isoformat(), "edits": args.edits, "command": f"python benchmarks/edit_judge.py"
              f" --edits {args.edits}"}
    for name, images in (("ground-truth targets", targets), ("unedited sources", sources)):
        rows = judge_edits(evaluator, images, edits)
        result[name] = {kind: {key: float(np.mean([r[key] for e, r in zip(edits, rows) if e.kind == kind]))
                               for key in ("changed", "kept")} for kind in KINDS}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
