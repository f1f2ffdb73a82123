"""What shapes-vqa's frame tokens carry: probes of the projected tokens of single frames, for shape and background.

Frames with one object well inside the view are drawn from training streams; each frame's 16
projected tokens (what the language model reads) are flattened, and a small MLP is fitted on 70%
of them to name the object's shape, another the background, each scored on the other 30%. A
tower that keeps the background but not the shape gives 1.0 and chance (1/3) here: the answers
to `entered_first` and `colour_before` then have nothing to read.

    python benchmarks/vqa_probe.py WEIGHTS [WEIGHTS ...] --out benchmarks/results/vqa_probe_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import LlavaForConditionalGeneration

from tempocache.reference import shapes_stream


def frames_with_one_object(streams: int, margin: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frames, shape index, background index) of up to 3 frames per training stream, 40 frames apart."""
    images, shapes, backgrounds = [], [], []
    for seed in range(streams):
        stream = shapes_stream.ShapesStream(seed, 256)
        lone = [i for i, state in enumerate(stream.states) if len(state["objects"]) == 1
                and all(margin < c < stream.size - margin for c in state["objects"][0][2:])]
        for i in lone[::40][:3]:
            state = stream.states[i]
            images.append(stream.render(i, i + 1)[0])
            shapes.append(shapes_stream.SHAPES.index(state["objects"][0][0]))
            backgrounds.append(list(shapes_stream.BACKGROUNDS).index(state["background"]))
    return torch.stack(images), torch.tensor(shapes), torch.tensor(backgrounds)


def probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 400) -> float:
    """Held-out accuracy of an MLP fitted on the first 70% of (features, labels)."""
    torch.manual_seed(0)
    train = torch.arange(len(labels)) < int(0.7 * len(labels))
    net = torch.nn.Sequential(torch.nn.Linear(features.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, classes))
    optimizer = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(net(features[train]), labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (net(features[~train]).argmax(1) == labels[~train]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, nargs="+", help="folders written by train-vqa")
    parser.add_argument("--names", nargs="+", default=None, help="a name for each folder in the results")
    parser.add_argument("--streams", type=int, default=400, help="training streams the frames are drawn from")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    images, shapes, backgrounds = frames_with_one_object(args.streams)
    result = {"date": datetime.date.today().isoformat(), "frames": len(images), "chance_shape": 1 / 3,
              "models": {}}
    names = args.names or [folder.name for folder in args.weights]
    if len(names) != len(args.weights):
        raise SystemExit(f"{len(names)} names for {len(args.weights)} folders")
    for name, folder in zip(names, args.weights):
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            tokens = torch.stack(list(model.model.get_image_features(pixel_values=images).pooler_output))
        features = tokens.flatten(1)
        features = (features - features.mean(0)) / (features.std(0) + 1e-3)
        steps = json.loads((folder / "training.json").read_text())["steps"]
        result["models"][name] = row = {"steps": steps, "shape": probe(features, shapes, len(shapes_stream.SHAPES)),
                                               "background": probe(features, backgrounds, len(shapes_stream.BACKGROUNDS))}
        print(name, json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
