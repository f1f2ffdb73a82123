"""The ShapesWorld evaluator: a small 3D CNN that reads a clip's attributes.

Its outputs are slotted by colour, so it answers without any object ordering:
for each object colour, is an object of that colour present, and if so which
shape is it and how does it move; plus the background colour. Its penultimate
features serve for a Fréchet distance between generated and real clips.
Images are read as static clips (the frame repeated).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from ..reference import shapesworld
from ..reference.shapesworld import BACKGROUND_NAMES, COLOUR_NAMES, MOTION_NAMES, SHAPES, Scene

WEIGHTS_DIR = Path(__file__).parent / "weights"
STREAM_EVALUATOR_DIR = WEIGHTS_DIR / "stream"  # the streaming model's, trained on endless clips
INPUT_FRAMES = shapesworld.DEFAULT_FRAMES
INPUT_SIZE = shapesworld.DEFAULT_SIZE
FEATURE_DIM = 256
_NC, _NS, _NM = len(COLOUR_NAMES), len(SHAPES), len(MOTION_NAMES)


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()

        def conv(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())

        self.body = nn.Sequential(
            conv(3, width, (1, 1, 1)),
            conv(width, 2 * width, (1, 2, 2)),  # 8 x 16 x 16
            conv(2 * width, 2 * width, (2, 2, 2)),  # 4 x 8 x 8
            conv(2 * width, 4 * width, (2, 2, 2)),  # 2 x 4 x 4
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 2 * 4 * 4, FEATURE_DIM), nn.GELU())
        self.head = nn.Linear(FEATURE_DIM, len(BACKGROUND_NAMES) + _NC * (1 + _NS + _NM))

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """clips (B, T, H, W, 3) in [0, 1] -> (features (B, 256), logits by attribute)."""
        features = self.features(self.body(_standardise(clips)))
        out = self.head(features)
        nb = len(BACKGROUND_NAMES)
        slots = out[:, nb:].view(-1, _NC, 1 + _NS + _NM)
        return features, {
            "background": out[:, :nb],
            "present": slots[..., 0],
            "shape": slots[..., 1 : 1 + _NS],
            "motion": slots[..., 1 + _NS :],
        }


def _standardise(clips: torch.Tensor) -> torch.Tensor:
    """Any (B, T, H, W, 3) clip -> (B, 3, 8, 32, 32) centred pixels, resampling frames and size."""
    x = clips.permute(0, 4, 1, 2, 3).float() * 2 - 1
    b, c, t, h, w = x.shape
    if t != INPUT_FRAMES:
        x = x[:, :, torch.linspace(0, t - 1, INPUT_FRAMES).round().long()]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_FRAMES, INPUT_SIZE, INPUT_SIZE), mode="trilinear", align_corners=False)
    return x


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Colour-slotted labels; -100 marks slots with no object (ignored by cross-entropy)."""
    present = torch.zeros(len(scenes), _NC)
    shape = torch.full((len(scenes), _NC), -100, dtype=torch.long)
    motion = torch.full((len(scenes), _NC), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            c = COLOUR_NAMES.index(obj.colour)
            present[i, c] = 1
            shape[i, c] = SHAPES.index(obj.shape)
            motion[i, c] = MOTION_NAMES.index(obj.motion)
    background = torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes])
    return {"background": background, "present": present, "shape": shape, "motion": motion}


def evaluator_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return (
        F.cross_entropy(logits["background"], targets["background"])
        + F.binary_cross_entropy_with_logits(logits["present"], targets["present"])
        + F.cross_entropy(logits["shape"].reshape(-1, _NS), targets["shape"].reshape(-1))
        + F.cross_entropy(logits["motion"].reshape(-1, _NM), targets["motion"].reshape(-1))
    )


def train_evaluator(
    out_dir: Path, minutes: float, device: str = "cuda", batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
    workers: int = 4, endless: bool = False,
) -> dict:
    """Train on fresh clips of every caption combination (each clip is seen once); `endless`: on stretches of
    endless clips (`shapesworld.render_stream`, objects wrapping round the frame), for the streaming model's
    evaluator (STREAM_EVALUATOR_DIR): the clip evaluator has never seen an object leave one side and enter the other."""
    torch.manual_seed(seed)
    model = AttributeClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    stream = shapesworld.BatchStream(batch_size, "all", seed=seed + 7, endless=endless)
    start, steps, losses = time.time(), 0, []
    for batch in DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None):
        if time.time() - start > minutes * 60:
            break
        clips = batch.clips.permute(0, 1, 3, 4, 2)
        # Generated clips are slightly noisy; teach the classifier to look past that.
        clips = (clips + 0.06 * torch.rand(len(clips), 1, 1, 1, 1) * torch.randn_like(clips)).clamp(0, 1)
        targets = {k: v.to(device) for k, v in scene_targets(batch.scenes).items()}
        loss = evaluator_loss(model(clips.to(device))[1], targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 200 == 0:
            losses.append([steps, loss.item()])
            print(f"evaluator step {steps} loss {loss.item():.4f}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out_dir / "evaluator.safetensors")
    state = {"steps": steps, "batch_size": batch_size, "seconds": round(time.time() - start, 1), "losses": losses, "endless": endless,
             "device": torch.cuda.get_device_name() if device.startswith("cuda") else device}
    (out_dir / "training.json").write_text(json.dumps(state, indent=1))
    return state


def load_evaluator(device: str | torch.device = "cpu", directory: Path = WEIGHTS_DIR) -> AttributeClassifier:
    path = directory / "evaluator.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no evaluator weights at {path}; train them with `tempocache train-evaluator`")
    model = AttributeClassifier()
    model.load_state_dict(load_file(path))
    return model.to(device).eval()
