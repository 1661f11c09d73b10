"""`video`: 16-frame sentences sampled at frame strides 10, 20 and 30 (tasks `video_s10`, ...).

    uvd run recipes/video.yaml --set inputs=/data/videos --out out/video

One unit per video file (mp4, webm, mkv, avi). `read_unit` plans every window of every stride,
decodes the union of their frames once, in order (decord; PyAV when decord fails on a file),
and yields each distinct frame as one item `<video>#f<index:06d>`; frames wait in a small
buffer until a window that uses them is complete, so a video cut short never yields frames no
sentence can use. `assemble` rebuilds the windows from the tokenized frames by key
(`uvd.source.assemble_windows`, shared with the multi-view source).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from uvd.records import INCOMPLETE_WINDOW, ImageRecord, Item, Reject, RejectError, Sentence, reason  # noqa: F401  (INCOMPLETE_WINDOW: given via assemble_windows)
from uvd.registry import register_source
from uvd.source import Source, UnitImages, assemble_windows, find_input_files, input_file_unit, limit_items

log = logging.getLogger(__name__)

CORRUPT_VIDEO = reason("corrupt_video", "a video neither decoder (decord, PyAV) can open")
TRUNCATED_VIDEO = reason("truncated_video", "a video that ends (or stops decoding) before frames its header promises")
TOO_SHORT = reason("too_short", "a video too short for a window of any stride")
DECODERS = ("auto", "decord", "pyav")
DECODE_CHUNK = 16  # frames per decord get_batch call: bounds memory on long or large videos


@dataclass
class VideoOptions:
    strides: list[int] = field(default_factory=lambda: [10, 20, 30])
    frames_per_sentence: int = 16
    start_frame: int = 0  # first frame of each stride's first window
    window_step: int | None = None  # frames between window starts; null: frames_per_sentence x stride (back to back)
    max_windows: int | None = 4  # windows per stride and video, first ones first; null: all that fit
    decode_short_side: int | None = 256  # decoders downscale so the shorter side is at most this; null: full size
    decoder: str = "auto"  # auto: decord, PyAV when decord fails on a file; or decord, pyav
    extensions: list[str] = field(default_factory=lambda: ["mp4", "webm", "mkv", "avi"])

    def validate(self, path: str) -> None:
        if not self.strides or any(s < 1 for s in self.strides) or len(set(self.strides)) != len(self.strides):
            raise ValueError(f"{path}.strides: give distinct strides >= 1, got {self.strides}")
        if not 1 <= self.frames_per_sentence <= 16:
            raise ValueError(f"{path}.frames_per_sentence: must be in 1..16, got {self.frames_per_sentence}")
        if self.start_frame < 0:
            raise ValueError(f"{path}.start_frame: must be >= 0, got {self.start_frame}")
        for name in ("window_step", "max_windows", "decode_short_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{path}.{name}: must be >= 1 or null, got {value}")
        if self.decoder not in DECODERS:
            raise ValueError(f"{path}.decoder: {self.decoder!r} is not one of {', '.join(DECODERS)}")
        if not self.extensions:
            raise ValueError(f"{path}.extensions: name at least one file extension")


def plan_windows(num_frames: int, options: VideoOptions) -> dict[int, list[list[int]]]:
    """stride -> its windows' frame indices; only windows that fit entirely in `num_frames`."""
    n = options.frames_per_sentence
    plan = {}
    for stride in options.strides:
        step = options.window_step or n * stride
        windows, start = [], options.start_frame
        while start + (n - 1) * stride < num_frames and (options.max_windows is None or len(windows) < options.max_windows):
            windows.append([start + i * stride for i in range(n)])
            start += step
        plan[stride] = windows
    return plan


def frame_key(video: str, index: int) -> str:
    return f"{video}#f{index:06d}"


def _scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Even (width, height) with the shorter side at most `short_side` (never enlarged)."""
    if not short_side or min(width, height) <= short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _probe_size(path: str) -> tuple[int, int]:
    """(width, height) from the container header (PyAV; no frame is decoded)."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise RejectError(CORRUPT_VIDEO, "no video stream")
        context = container.streams.video[0].codec_context
        return context.width, context.height


class DecordReader:
    name = "decord"

    def __init__(self, path: str, short_side: int | None):
        import decord

        self.width, self.height = _probe_size(path)
        w, h = _scaled_size(self.width, self.height, short_side)
        size = {"width": w, "height": h} if (w, h) != (self.width, self.height) else {}
        self.reader = decord.VideoReader(path, num_threads=1, **size)
        self.num_frames = len(self.reader)
        self.fps = float(self.reader.get_avg_fps())

    def frames(self, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(indices), DECODE_CHUNK):
            chunk = indices[start : start + DECODE_CHUNK]
            batch = self.reader.get_batch(chunk).asnumpy()  # (len(chunk), H, W, 3) uint8
            yield from zip(chunk, batch)


class PyAVReader:
    name = "pyav"

    def __init__(self, path: str, short_side: int | None):
        import av

        self.path, self.short_side = path, short_side
        with av.open(path) as container:
            if not container.streams.video:
                raise RejectError(CORRUPT_VIDEO, "no video stream")
            stream = container.streams.video[0]
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            self.fps = float(stream.average_rate or 0)
            self.num_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)  # mkv/webm: count packets

    def frames(self, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        import av

        wanted, last = set(indices), indices[-1]
        w, h = _scaled_size(self.width, self.height, self.short_side)
        with av.open(self.path) as container:
            for index, frame in enumerate(container.decode(video=0)):  # sequential: every frame of the span
                if index in wanted:
                    yield index, frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
                if index >= last:
                    return


def open_video(path: str, decoder: str, short_side: int | None):
    """The first decoder that can open `path`; RejectError(corrupt_video) when none can."""
    errors = []
    for cls in {"decord": [DecordReader], "pyav": [PyAVReader]}.get(decoder, [DecordReader, PyAVReader]):
        try:
            reader = cls(path, short_side)
            if errors:
                log.info("%s: decoding with %s (%s)", path, cls.name, "; ".join(errors))
            return reader
        except RejectError as err:
            errors.append(f"{cls.name}: {err.detail}")
        except Exception as err:  # noqa: BLE001  decord raises its own DECORDError/RuntimeError, PyAV many FFmpegError kinds
            errors.append(f"{cls.name}: {type(err).__name__}: {str(err)[:150]}")
    raise RejectError(CORRUPT_VIDEO, "; ".join(errors))


@register_source
class VideoSource(Source):
    name = "video"
    Options = VideoOptions
    units_per_part = 8
    input_hint = "video files (*.mp4, *.webm, *.mkv, *.avi)"

    @classmethod
    def check_recipe(cls, recipe) -> None:
        short = recipe.sentence.decode_short_side
        if short is not None and short < recipe.image.size:
            raise ValueError(f"sentence.decode_short_side: {short} is below image.size={recipe.image.size}; frames would be upscaled")

    def list_units(self) -> list[str]:
        return [str(p) for p in self._videos()]

    def _videos(self) -> dict[Path, str]:
        """Absolute path -> the name used in keys (relative to its input folder)."""
        if getattr(self, "_names", None) is None:
            self._names = find_input_files(self.recipe.inputs, self.options.extensions, "videos")
        return self._names

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        return limit_items(self._read(unit), max_items)

    def _read(self, unit: str) -> Iterator[Item]:
        _, name, refused = input_file_unit(unit, self._videos(), self.recipe.limits.max_file_bytes)
        if refused:
            yield refused
            return
        try:
            video = open_video(unit, self.options.decoder, self.options.decode_short_side)
        except RejectError as err:
            yield Item(name, reject=err.reason, detail=err.detail[:300])
            return
        plan = plan_windows(video.num_frames, self.options)
        windows = [w for ws in plan.values() for w in ws]
        if not windows:
            yield Item(name, reject=TOO_SHORT, detail=f"{video.num_frames} frames: no window of strides {self.options.strides} fits")
            return
        windows_of: dict[int, list[int]] = {}
        for w, frames in enumerate(windows):
            for f in frames:
                windows_of.setdefault(f, []).append(w)
        missing = [len(frames) for frames in windows]  # frames each window still waits for
        needed = sorted(windows_of)
        meta = {"video": name, "num_frames": video.num_frames, "fps": video.fps, "decoder": video.name,
                "video_size": [video.width, video.height]}
        buffer: dict[int, np.ndarray] = {}  # decoded frames no complete window uses yet
        done, last = 0, -1
        try:
            for index, array in video.frames(needed):
                buffer[index], done, last = array, done + 1, index
                for w in windows_of[index]:
                    missing[w] -= 1
                    if missing[w] == 0:  # window complete: release its frames still waiting
                        for f in windows[w]:
                            if f in buffer:
                                yield Item(frame_key(name, f), array=buffer.pop(f), meta={**meta, "frame": f})
        except Exception as err:  # noqa: BLE001  decoders fail mid-file with many exception types
            detail = f"{video.name} stopped after frame {last}: {type(err).__name__}: {str(err)[:150]}"
        else:
            detail = f"the file ends after frame {last}" if done < len(needed) else ""
        if done < len(needed):
            lost = sum(1 for m in missing if m)
            yield Item(name, reject=TRUNCATED_VIDEO,
                       detail=f"{detail}; header says {video.num_frames} frames; {lost} of {len(windows)} windows lost")

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        for unit in units:
            if not unit.images:
                continue
            first = unit.images[0].meta
            name, num_frames = first["video"], first["num_frames"]
            windows = [((stride, j, frames), [frame_key(name, f) for f in frames])
                       for stride, plan in plan_windows(num_frames, self.options).items() for j, frames in enumerate(plan)]

            def sentence(window: tuple[int, int, list[int]], images: list[ImageRecord]) -> Sentence:
                stride, j, frames = window
                meta = {"video": name, "stride": stride, "window": j, "start_frame": frames[0],
                        "frame_indices": frames, "fps": first["fps"], "num_frames": num_frames,
                        "decoder": first["decoder"], "video_size": first["video_size"]}
                return Sentence(f"video_s{stride}", images, meta=meta)

            yield from assemble_windows(unit, windows, sentence, "every window using this frame lost another frame")


def decode_accounting(images: list[ImageRecord], sentences: list[Sentence]) -> dict[str, int]:
    """Distinct frames decoded (one tokenized image each) vs frame uses by sentences."""
    return {"decoded": len({im.key for im in images}), "uses": sum(len(s.images) for s in sentences)}
