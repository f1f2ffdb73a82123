"""Writing a stream to MP4 as its frames are made, so that the file plays even if the run is cut short.

ffmpeg (imageio-ffmpeg's own build) encodes H.264 into a fragmented MP4: each fragment is
complete on its own (`frag_keyframe+empty_moov`), so a file whose writer was interrupted
holds every fragment flushed before that and plays as it is.
"""

from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import numpy as np

SUFFIX = ".mp4"


def check_video_path(path: Path) -> None:
    if path.suffix.lower() != SUFFIX:
        raise ValueError(f"output {str(path)!r} must end in {SUFFIX} (a stream is written as it is made)")
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; give a file name ending in {SUFFIX}")
    if not path.parent.resolve().is_dir():
        raise ValueError(f"output folder {str(path.parent)!r} does not exist")


class MP4Writer:
    """`write(frames)` frames (T, H, W, 3) in [0, 1] as they come, each upscaled `scale` times; `close()` at the end."""

    def __init__(self, path: str | Path, fps: float = 8.0, scale: int = 4, keyframe_every: int = 16):
        self.path, self.fps, self.scale, self.keyframe_every = Path(path), fps, scale, keyframe_every
        check_video_path(self.path)
        self._encoder = None

    def write(self, frames: np.ndarray) -> None:
        pixels = (np.asarray(frames) * 255).round().astype(np.uint8).repeat(self.scale, 1).repeat(self.scale, 2)
        if self._encoder is None:
            height, width = pixels.shape[1:3]
            self._encoder = imageio_ffmpeg.write_frames(
                str(self.path), (width, height), fps=self.fps, codec="libx264", quality=None, macro_block_size=1,
                ffmpeg_log_level="error", output_params=["-movflags", "frag_keyframe+empty_moov", "-crf", "18",
                                                         "-g", str(self.keyframe_every)])
            self._encoder.send(None)
        for frame in pixels:
            self._encoder.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None

    def __enter__(self) -> "MP4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
