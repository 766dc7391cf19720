"""Tests for data.py: reading real (and broken) media files, the paper's preprocessing, the
dataset / collate / skip-tracking contract, and the embedded dataset generator.

Every media file is written here with PyAV (or data.write_clip) into a temporary folder, so
the tests need no network and no files of their own. Frames that must be identified after a
lossy round trip carry their index as a grid of dark / bright blocks (`marked_frames`)."""

import itertools
import json
import math
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio

import data
import model

TINY = data.MediaConfig.from_model(model.tiny_config())


# -----------------------------------------------------------------------------
# Helpers: writing media files


def encode_video(path, frames, codec="libx264", pix_fmt="yuv420p", fmt=None, fps=8,
                 pts=None, options=None, gop=None):
    """Write uint8 frames (T, H, W, 3), or (T, H, W) for greyscale, as one video stream.
    `pts` (milliseconds) gives each frame its own time, for variable frame rates."""
    options = {"preset": "ultrafast", "tune": "zerolatency"} if options is None and codec == "libx264" else options
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        vs.codec_context.thread_count = 1
        if pts is not None:
            vs.time_base = vs.codec_context.time_base = Fraction(1, 1000)
        if gop:
            vs.codec_context.gop_size = gop
        if options:
            vs.options = options
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="gray" if f.ndim == 2 else "rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)


def encode_audio(path, channels, rate, codec="aac", fmt="mp4"):
    """Write float channels (C, N) in [-1, 1], C = 1 or 2, as the file's only stream."""
    C, N = channels.shape
    layout = "mono" if C == 1 else "stereo"
    sample_fmt = "fltp" if codec == "aac" else "s16"
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        step = stream.codec_context.frame_size or 1024
        for i in range(0, N, step):
            piece = np.zeros((C, step), dtype=np.float32)
            piece[:, :min(step, N - i)] = channels[:, i:i + step]
            if sample_fmt == "s16":  # packed: one row of interleaved samples
                piece = (piece.T.reshape(1, -1) * 32767).round().astype(np.int16)
                piece = piece[:, :min(step, N - i) * C]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format=sample_fmt, layout=layout)
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def pcm_wav(path, channels, rate):
    """Write float channels (C, N) as 16-bit PCM; returns the float samples a reader must
    give back exactly, as torchaudio.load does: the stored integers / 32768."""
    encode_audio(path, channels, rate, "pcm_s16le", "wav")
    return torch.from_numpy((channels * 32767).round() / 32768).float()


def tone(seconds, freq=440.0, amplitude=0.4, rate=data.SAMPLE_RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def marked_frames(T, size):
    """uint8 (T, size, size, 3): frame t shows the 16 bits of t as a 4x4 grid of dark (0) and
    bright (1) blocks, which survives lossy coding."""
    b = size // 4
    frames = np.empty((T, size, size, 3), dtype=np.uint8)
    for t in range(T):
        for bit in range(16):
            r, c = divmod(bit, 4)
            frames[t, r * b:(r + 1) * b, c * b:(c + 1) * b] = 230 if (t >> bit) & 1 else 20
    return frames


def read_marks(frames):
    """The frame indices written by `marked_frames`, from decoded (T, H, W, 3) frames."""
    x = torch.as_tensor(frames).float().mean(-1)  # (T, H, W)
    b = x.shape[-1] // 4
    marks = []
    for f in x:
        bits = [f[r * b + b // 4:(r + 1) * b - b // 4, c * b + b // 4:(c + 1) * b - b // 4].mean() > 125
                for r, c in (divmod(bit, 4) for bit in range(16))]
        marks.append(sum(1 << i for i, on in enumerate(bits) if on))
    return marks


def video_packets(path):
    """(pts, byte position, size, is_keyframe) of every video packet, in presentation order."""
    with av.open(str(path)) as c:
        return sorted((p.pts, p.pos, p.size, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size)


def read_frames_via(route, path, num_frames, monkeypatch):
    """read_video_frames forced down one route: 'one pass' (small files: decode everything,
    convert the chosen frames) or 'seeking' (index the packets, seek to key frames)."""
    calls = []
    one_pass = data._read_short
    monkeypatch.setattr(data, "_read_short", lambda *a: calls.append(a) or one_pass(*a))
    monkeypatch.setattr(data, "SMALL_FILE_PIXELS", 10 ** 9 if route == "one pass" else 0)
    frames = data.read_video_frames(str(path), num_frames)
    assert bool(calls) == (route == "one pass"), "the route was not the one asked for"
    return frames


def one_item_dataset(tmp_path, src, media=TINY, **kw):
    """A dataset of one record whose media is the file `src` (copied to <id>.mp4)."""
    folder = tmp_path / "ds"
    folder.mkdir(exist_ok=True)
    os.replace(src, folder / "clip.mp4")
    (tmp_path / "ann.json").write_text(json.dumps([{"id": "clip", "caption": "a clip"}]))
    return data.AVCaptionDataset(str(tmp_path / "ann.json"), str(folder), media, **kw)


def assert_skipped(tmp_path, src, reason):
    """The dataset turns the file into an error item with `reason`, and collate skips it."""
    ds = one_item_dataset(tmp_path, src)
    path = os.path.join(ds.data_dir, "clip.mp4")
    item = ds[0]
    assert item == {"id": "clip", "error": (path, reason)}
    batch = data.collate([item])
    assert batch["ids"] == [] and batch["skipped"] == [(path, reason)]


ROUTES = ["one pass", "seeking"]


# -----------------------------------------------------------------------------
# Shared media (written once per module)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """60 s of 64x64 at 25 fps, H.264 with B-frames and a key frame every 50 frames: 1500
    frames, each marked with its index. Big enough that read_video_frames seeks."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    encode_video(path, marked_frames(1500, 64), fps=25, options={"preset": "veryfast"}, gop=50)
    return path


@pytest.fixture(scope="module")
def clip_8s(tmp_path_factory):
    """data.write_test_clip: 8 s of 64x64 at 25 fps with a tone (200 frames, one GOP)."""
    path = tmp_path_factory.mktemp("clip8") / "clip.mp4"
    data.write_test_clip(str(path), 8, 64, 64, fps=25)
    return path


def copy_bytes(src, dst, edit=None):
    raw = bytearray(open(src, "rb").read())
    if edit:
        edit(raw)
    open(dst, "wb").write(bytes(raw))
    return dst


# -----------------------------------------------------------------------------
# 1. Robustness of the readers: one test per kind of file


def test_zero_byte_file_is_an_empty_file_error(tmp_path):
    path = tmp_path / "zero.mp4"
    path.write_bytes(b"")
    for read in (lambda p: data.read_video_frames(p, 8), data.read_audio):
        with pytest.raises(data.MediaError) as e:
            read(str(path))
        assert e.value.reason == "empty file"
    assert_skipped(tmp_path, path, "empty file")


def test_random_bytes_fail_at_open(tmp_path):
    path = tmp_path / "random.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(data.MediaError) as e:
        data.read_video_frames(str(path), 8)
    assert e.value.reason == "cannot open (InvalidDataError)"
    assert_skipped(tmp_path, path, "cannot open (InvalidDataError)")


def test_truncated_mp4_fails_at_open(tmp_path, clip_8s):
    # PyAV's mp4 muxer writes the index (moov) after the media data (mdat): the first half of
    # the file has no index, so FFmpeg cannot open it at all
    raw = open(clip_8s, "rb").read()
    assert raw.find(b"moov") > len(raw) // 2
    path = copy_bytes(clip_8s, tmp_path / "half.mp4", lambda b: b.__delitem__(slice(len(b) // 2, None)))
    with pytest.raises(data.MediaError) as e:
        data.read_video_frames(str(path), 8)
    assert e.value.reason == "cannot open (InvalidDataError)"
    assert_skipped(tmp_path, path, "cannot open (InvalidDataError)")


def damage_at(src, dst, position, n, seed=0):
    """Overwrite n bytes at `position` with random bytes."""
    noise = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return copy_bytes(src, dst, lambda b: b.__setitem__(slice(position, position + n), noise))


@pytest.mark.parametrize("route", ROUTES)
def test_corruption_in_mdat_opens_and_fails_while_decoding(tmp_path, clip_8s, route, monkeypatch):
    # 1 KiB of noise from the start of the packet of the 5th of 8 wanted frames, in the middle
    # of the media data: both routes decode that frame
    packets = video_packets(clip_8s)
    target = packets[data.uniform_indices(len(packets), 8)[4]]
    path = damage_at(clip_8s, tmp_path / "damaged.mp4", target[1], 1024)
    with av.open(str(path)) as c:  # the container and its index are intact...
        assert c.streams.video and c.streams.audio
        assert len([p for p in c.demux(c.streams.video[0]) if p.size]) == len(packets)
    with pytest.raises(data.MediaError) as e:  # ...the decoder is what fails
        read_frames_via(route, path, 8, monkeypatch)
    assert e.value.reason == "decoding failed (InvalidDataError)"
    assert_skipped(tmp_path, path, "decoding failed (InvalidDataError)")


def test_damage_the_seeking_reader_never_decodes_goes_unnoticed(tmp_path, long_clip):
    # What seeking means for broken files: only the frames from a key frame up to a wanted
    # frame are decoded, so damage elsewhere does not stop read_video_frames (it returns the
    # right frames) while the decode-everything baseline fails on it
    packets = video_packets(long_clip)
    keys = [i for i, p in enumerate(packets) if p[3]]
    wanted = data.uniform_indices(len(packets), 8)
    t = wanted[2]
    key = max(k for k in keys if k <= t)
    assert wanted[1] < key - 1  # frame key-1 lies in a stretch the seeking reader skips
    pts, pos, size, _ = packets[key - 1]
    path = damage_at(long_clip, tmp_path / "damaged.mp4", pos, size)
    assert read_marks(data.read_video_frames(str(path), 8)) == wanted
    with pytest.raises(data.MediaError, match="decoding failed"):
        data.read_video_frames_decode_all(str(path), 8)


def test_no_audio_stream_gives_zeros_and_a_false_mask(tmp_path):
    rng = np.random.default_rng(0)
    silent_film = tmp_path / "video_only.mp4"
    data.write_clip(str(silent_film), rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), None)
    assert data.read_audio(str(silent_film)) is None
    ds = one_item_dataset(tmp_path, silent_film)
    item = ds[0]
    assert item["audio_missing"] is True and "audio" not in item and item["video"].shape == (3, 8, 32, 32)
    # next to a clip with sound: zeros in its place, a False mask, counted as missing audio
    with_sound = {**item, "audio": torch.randn(3, 32, 208), "audio_missing": False, "id": "other"}
    batch = data.collate([with_sound, item])
    assert batch["audio"].shape == (2, 3, 32, 208)
    assert torch.equal(batch["audio"][1], torch.zeros(3, 32, 208))
    assert batch["audio_mask"].tolist() == [True, False] and batch["video_mask"].tolist() == [True, True]
    assert batch["missing_audio"] == 1 and batch["skipped"] == []
    tracker = data.SkipTracker()
    tracker.update(batch)
    assert tracker.report() == "2 clips, 0 skipped (none), 1 without audio"


def test_stereo_sound_shorter_than_one_window_counts_as_missing(tmp_path):
    # 300 samples per channel (600 in all) is still shorter than the 400-sample fbank window
    clip = tmp_path / "clip.mp4"
    data.write_clip(str(clip), np.zeros((8, 32, 32, 3), np.uint8), None)
    ds = one_item_dataset(tmp_path, clip)
    pcm_wav(tmp_path / "ds" / "clip.wav", np.stack([tone(300 / 16000)] * 2), 16000)
    item = ds[0]
    assert item["audio_missing"] is True and "audio" not in item


def test_batch_where_no_clip_has_audio_has_no_audio_tensor():
    # collate cannot know the audio shape when nobody has audio: None, with all-False masks
    # (consumers must check the mask or None before indexing batch["audio"])
    item = {"id": "a", "caption": "c", "record": {}, "path": "a.mp4", "video": torch.zeros(3, 4, 32, 32),
            "audio_missing": True}
    batch = data.collate([item, {**item, "id": "b"}])
    assert batch["audio"] is None and batch["audio_mask"].tolist() == [False, False]
    assert batch["missing_audio"] == 2


def test_audio_only_file_is_skipped_with_reason(tmp_path):
    path = tmp_path / "audio_only.mp4"
    encode_audio(path, tone(1.0)[None], data.SAMPLE_RATE)
    assert data.read_audio(str(path)).shape[-1] == pytest.approx(16000, rel=0.05)
    with pytest.raises(data.MediaError) as e:
        data.read_video_frames(str(path), 8)
    assert e.value.reason == "no video stream"
    assert_skipped(tmp_path, path, "no video stream")


@pytest.mark.parametrize("name,codec,pix_fmt,fmt,reason", [
    ("still.png", "png", "rgb24", "image2", "a still image"),  # opened by FFmpeg's png_pipe
    ("still.jpg", "mjpeg", "yuvj420p", "image2", "a still image"),  # jpeg_pipe
    ("one.mp4", "libx264", "yuv420p", None, "a single frame")])
def test_a_still_picture_is_not_a_video(tmp_path, name, codec, pix_fmt, fmt, reason):
    """FFmpeg opens a picture as a one-frame video stream; it is skipped, not read as a clip."""
    path = tmp_path / name
    encode_video(path, marked_frames(1, 32), codec=codec, pix_fmt=pix_fmt, fmt=fmt)
    with pytest.raises(data.MediaError) as e:
        data.read_video_frames(str(path), 8)
    assert e.value.reason == reason
    assert_skipped(tmp_path, path, reason)


@pytest.mark.parametrize("route", ROUTES)
def test_fewer_frames_than_requested_repeat(tmp_path, route, monkeypatch):
    path = tmp_path / "three.mp4"
    encode_video(path, marked_frames(3, 32))
    frames = read_frames_via(route, path, 8, monkeypatch)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == torch.uint8
    # linspace(0, 2, 8) = 0, .29, .57, .86, 1.14, 1.43, 1.71, 2, truncated
    assert read_marks(frames) == [0, 0, 0, 0, 1, 1, 1, 2] == data.uniform_indices(3, 8)


def test_odd_frame_size(tmp_path):
    # x264 needs even sizes in 4:2:0; in 4:4:4 (no chroma subsampling) 33x17 encodes
    path = tmp_path / "odd.mp4"
    encode_video(path, np.random.default_rng(0).integers(0, 255, (6, 17, 33, 3), dtype=np.uint8),
                 pix_fmt="yuv444p")
    frames = data.read_video_frames(str(path), 8)
    assert frames.shape == (8, 17, 33, 3)
    assert data.preprocess_video(frames, 32).shape == (3, 8, 32, 32)
    assert data.preprocess_video(frames, 224).shape == (3, 8, 224, 224)


def test_greyscale_source(tmp_path):
    # FFV1 stores the 'gray' pixel format itself (lossless), in Matroska
    grey = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (6, 24, 1))  # (T, H, W)
    path = tmp_path / "grey.mkv"
    encode_video(path, grey, codec="ffv1", pix_fmt="gray", fmt="matroska")
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "gray"
    frames = data.read_video_frames(str(path), 8)
    assert frames.shape == (8, 24, 32, 3)
    for channel in range(3):  # R = G = B = the source
        assert torch.equal(frames[..., channel], torch.from_numpy(grey[:1]).expand(8, -1, -1))
    x = data.preprocess_video(frames, 32)
    assert x.shape == (3, 8, 32, 32)


@pytest.mark.parametrize("route", ROUTES)
def test_variable_frame_rate(tmp_path, route, monkeypatch):
    pts = [0, 40, 50, 60, 300, 310, 700, 710, 720, 1500, 1600, 1610]  # ms
    path = tmp_path / "vfr.mp4"
    encode_video(path, marked_frames(len(pts), 32), pts=pts)
    with av.open(str(path)) as c:  # the gaps survive in the file
        s = c.streams.video[0]
        assert [round(float(f.pts * s.time_base) * 1000) for f in c.decode(s)] == pts
    frames = read_frames_via(route, path, 8, monkeypatch)
    assert frames.shape == (8, 32, 32, 3)
    assert read_marks(frames) == data.uniform_indices(len(pts), 8)  # indices, not times


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
def test_audio_keeps_every_channel_and_is_resampled_by_torchaudio(tmp_path, rate):
    # the original: torchaudio.load (every channel, native rate), then
    # torchaudio.functional.resample with its default filter when the rate is not 16 kHz
    left, right = tone(1.5, freq=700, rate=rate), tone(1.5, freq=2500, amplitude=0.2, rate=rate)
    samples = pcm_wav(tmp_path / "stereo.wav", np.stack([left, right]), rate)  # (2, N)
    expected = samples if rate == 16000 else torchaudio.functional.resample(samples, rate, 16000)
    wave = data.read_audio(str(tmp_path / "stereo.wav"))
    assert wave.dtype == torch.float32 and wave.shape == (2, 24000)
    assert torch.equal(wave, expected)


def test_compressed_stereo_keeps_both_channels(tmp_path):
    seconds = 3
    left = tone(seconds, rate=48000)
    path = tmp_path / "stereo.mp4"
    encode_audio(path, np.stack([left, np.zeros_like(left)]), 48000)
    with av.open(str(path)) as c:
        assert (c.streams.audio[0].rate, c.streams.audio[0].channels) == (48000, 2)
    wave = data.read_audio(str(path))
    assert wave.shape[0] == 2 and wave.shape[1] == pytest.approx(seconds * 16000, rel=0.02)
    rms = wave.pow(2).mean(1).sqrt()  # per channel: the tone on the left, silence on the right
    assert rms[0].item() == pytest.approx(0.4 / math.sqrt(2), rel=0.02) and rms[1].item() < 1e-3


def test_long_clip_seeking_picks_the_same_frames_as_decoding_everything(long_clip, monkeypatch):
    with av.open(str(long_clip)) as c:
        s = c.streams.video[0]
        assert s.frames * s.codec_context.width * s.codec_context.height > data.SMALL_FILE_PIXELS
    assert sum(p[3] for p in video_packets(long_clip)) >= 30  # many key frames to seek to
    monkeypatch.setattr(data, "_read_in_order", lambda *a: pytest.fail("seeking fell back to one pass"))
    seeking = data.read_video_frames(str(long_clip), 8)
    everything = data.read_video_frames_decode_all(str(long_clip), 8)
    assert seeking.shape == (8, 64, 64, 3)
    assert torch.equal(seeking, everything)
    assert read_marks(seeking) == data.uniform_indices(1500, 8)


def test_inexact_seeking_container_still_gives_the_right_frames(tmp_path, monkeypatch):
    # MPEG-TS seeks land on a later key frame than asked for; the reader notices the missed
    # frame and decodes in order instead of returning frames from the wrong times
    path = tmp_path / "clip.ts"
    encode_video(path, marked_frames(300, 64), fmt="mpegts", fps=25, options={"preset": "veryfast"}, gop=30)
    fallbacks = []
    in_order = data._read_in_order
    monkeypatch.setattr(data, "_read_in_order", lambda *a: fallbacks.append(a) or in_order(*a))
    assert read_marks(data.read_video_frames(str(path), 8)) == data.uniform_indices(300, 8)
    assert fallbacks, "the seeks were exact: this file does not test the fallback"


def test_sidecar_wav_is_preferred_over_the_soundtrack(tmp_path):
    path = tmp_path / "clip.mp4"
    data.write_clip(str(path), np.zeros((8, 32, 32, 3), np.uint8), tone(2.0))
    sidecar = tone(1.0, freq=1000, amplitude=0.3)
    encode_audio(tmp_path / "clip.wav", sidecar[None], data.SAMPLE_RATE, "pcm_s16le", "wav")
    wave = data.read_audio(str(path))
    assert wave.shape == (1, 16000)  # the 1 s sidecar, not the 2 s track
    torch.testing.assert_close(wave, torch.from_numpy(sidecar)[None], atol=1 / 32767, rtol=0)


# -----------------------------------------------------------------------------
# 2. Dataset, collate and skip tracking


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Two readable clips around an empty file; annotations in the authors' format."""
    root = tmp_path_factory.mktemp("set")
    rng = np.random.default_rng(1)
    for name in ("a", "c"):
        data.write_clip(str(root / f"{name}.mp4"), rng.integers(0, 255, (16, 48, 64, 3), dtype=np.uint8),
                        tone(2.0, freq=500 if name == "a" else 900))
    (root / "b.mp4").write_bytes(b"")
    ann = root / "ann.json"
    ann.write_text(json.dumps([{"id": n, "caption": f"clip {n}"} for n in "abc"]))
    return str(ann), str(root)


def test_unreadable_item_is_an_error_item_without_recursion(small_set, monkeypatch):
    ann, root = small_set
    ds = data.AVCaptionDataset(ann, root, TINY)
    opened = []
    reader = data.read_video_frames
    monkeypatch.setattr(data, "read_video_frames", lambda p, n: opened.append(p) or reader(p, n))
    item = ds[1]
    assert item == {"id": "b", "error": (os.path.join(root, "b.mp4"), "empty file")}
    assert opened == [os.path.join(root, "b.mp4")]  # no other index was tried in its place


def test_collate_drops_unreadable_items_and_lists_them(small_set):
    ann, root = small_set
    ds = data.AVCaptionDataset(ann, root, TINY)
    batch = data.collate([ds[0], ds[1], ds[2]])
    assert batch["ids"] == ["a", "c"] and batch["captions"] == ["clip a", "clip c"]
    assert batch["skipped"] == [(os.path.join(root, "b.mp4"), "empty file")]
    assert batch["video"].shape == (2, 3, 8, 32, 32) and batch["audio"].shape == (2, 3, 32, 208)
    assert batch["video_mask"].tolist() == [True, True] and batch["audio_mask"].tolist() == [True, True]


def batch_of(good=0, skipped=()):
    """A collated batch with `good` readable items and the given (path, reason) skips."""
    items = [{"id": f"g{i}", "caption": "c", "record": {}, "path": f"g{i}.mp4", "video": torch.zeros(1)}
             for i in range(good)]
    items += [{"id": p, "error": (p, r)} for p, r in skipped]
    return data.collate(items)


def skip_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped")]


def test_skip_tracker_names_each_file_once_in_one_line_per_batch(capsys):
    tracker = data.SkipTracker(max_skip_fraction=1.0)
    tracker.update(batch_of(2, [("x/bad.mp4", "empty file")]))
    tracker.update(batch_of(2, [("x/bad.mp4", "empty file")]))  # again: not named again
    tracker.reset()  # a new epoch: still not named again
    tracker.update(batch_of(2, [("x/bad.mp4", "empty file"), ("x/worse.mp4", "no video stream")]))
    assert skip_lines(capsys) == ["skipped x/bad.mp4 (empty file)", "skipped x/worse.mp4 (no video stream)"]
    # a batch of missing files: one line, three named, the rest counted
    tracker.update(batch_of(0, [(f"gone{i}.mp4", "missing file") for i in range(5)]))
    assert skip_lines(capsys) == ["skipped gone0.mp4 (missing file), gone1.mp4 (missing file), gone2.mp4 "
                                  "(missing file) and 2 more (counted in the epoch report)"]


def test_skip_tracker_reports_counts_per_reason():
    tracker = data.SkipTracker(max_skip_fraction=1.0)
    tracker.update(batch_of(3, [("1.mp4", "empty file"), ("2.mp4", "no video stream")]))
    tracker.update(batch_of(1, [("3.mp4", "empty file")]))
    assert tracker.reasons == {"empty file": 2, "no video stream": 1}
    assert tracker.report() == "7 clips, 3 skipped (empty file: 2, no video stream: 1), 0 without audio"


def test_skip_tracker_raises_above_the_max_skip_fraction():
    tracker = data.SkipTracker(max_skip_fraction=0.25, min_items=8)
    tracker.update(batch_of(1, [("1.mp4", "empty file")]))  # 1 of 2, but under min_items
    tracker.update(batch_of(5, []))  # 1 of 7
    tracker.update(batch_of(0, [("2.mp4", "empty file")]))  # 2 of 8 = the limit: allowed
    with pytest.raises(RuntimeError, match=r"3 of 9 clips unreadable, above the limit of 25%"):
        tracker.update(batch_of(0, [("3.mp4", "empty file")]))


BAD_CONFIGS = {
    "missing annotation file": (None, FileNotFoundError, "annotation file not found"),
    "invalid JSON": ('[{"id": "a", "caption": "x"},', ValueError, "not JSON"),
    "empty list": ("[]", ValueError, "no records"),
    "record lacking caption": ('[{"id": "a", "title": "x"}]', ValueError, "record 0 lacks 'caption'; its fields: id, title"),
    "record lacking both": ('[{"title": "x"}]', ValueError, "record 0 lacks 'id' and 'caption'; its fields: title"),
    "one object, not a list": ('{"videos": [], "sentences": []}', ValueError,
                               "one JSON object (fields: videos, sentences), but the file must hold a list of records"),
    "a pretty-printed object": ('{\n  "a": 1\n}\n', ValueError, "one JSON object (fields: a), but the file must hold"),
    "num_frames=0": ('[{"id": "a", "caption": "x"}]', ValueError, "num_frames must be >= 1"),
}


def test_json_lines_load_even_with_one_record(tmp_path):
    """One record on one line is one JSON object too, but a record (it has its id), not a wrapper."""
    one = tmp_path / "one.jsonl"
    one.write_text('{"id": "a", "caption": "x"}\n')
    assert data.load_annotations(str(one)) == [{"id": "a", "caption": "x"}]
    two = tmp_path / "two.jsonl"
    two.write_text('{"id": "a", "caption": "x"}\n{"id": "b", "caption": "y"}\n')
    assert [r["id"] for r in data.load_annotations(str(two))] == ["a", "b"]


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fails_at_construction_with_one_line(tmp_path, case):
    text, error, message = BAD_CONFIGS[case]
    ann = tmp_path / "ann.json"
    if text is not None:
        ann.write_text(text)
    media = data.MediaConfig(num_frames=0) if case == "num_frames=0" else TINY
    with pytest.raises(error) as e:
        data.AVCaptionDataset(str(ann), str(tmp_path), media)
    assert message in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# 3. Preprocessing


def test_tiny_sizes(small_set):
    assert TINY == data.MediaConfig(num_frames=8, image_size=32, num_mel_bins=32, target_length=208)
    ann, root = small_set
    item = data.AVCaptionDataset(ann, root, TINY)[0]
    assert item["video"].shape == (3, 8, 32, 32) and item["audio"].shape == (3, 32, 208)
    assert item["video"].dtype == item["audio"].dtype == torch.float32


def test_full_sizes():
    media = data.MediaConfig.from_model(model.full_config())
    assert media == data.MediaConfig(num_frames=8, image_size=224, num_mel_bins=112, target_length=1036)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 360, 640, 3), dtype=np.uint8))
    assert data.preprocess_video(frames, media.image_size).shape == (3, 8, 224, 224)
    wave = torch.from_numpy(np.random.default_rng(1).normal(0, 0.1, 12 * 16000).astype(np.float32))
    assert data.preprocess_audio(wave, media.num_mel_bins, media.target_length).shape == (3, 112, 1036)


def test_frame_indices_truncate_as_the_original():
    # the original: np.linspace(0, n - 1, T, dtype=int); with 10 frames and 8 wanted the
    # points are 0, 1.29, 2.57, 3.86, 5.14, 6.43, 7.71, 9 and truncation keeps the integer part
    assert data.uniform_indices(10, 8) == [0, 1, 2, 3, 5, 6, 7, 9]
    for n, T in itertools.product(range(1, 80), (1, 4, 8, 16)):
        assert data.uniform_indices(n, T) == np.linspace(0, n - 1, T, dtype=int).tolist()


@pytest.mark.parametrize("route", ROUTES)
def test_reader_returns_the_frames_at_the_truncated_indices(tmp_path, route, monkeypatch):
    path = tmp_path / "ten.mp4"
    encode_video(path, marked_frames(10, 32))
    assert read_marks(read_frames_via(route, path, 8, monkeypatch)) == [0, 1, 2, 3, 5, 6, 7, 9]


def test_short_side_scale_size_rule():
    # short side to the target, long side floor(long / short * target) in floating point
    # (pytorchvideo's short_side_scale): 640 / 360 * 224 = 398.2, 33 / 17 * 224 = 434.8, and
    # 230 / 224 * 224 = 229.99999999999997
    expected = {(360, 640, 224): (224, 398), (640, 360, 224): (398, 224), (17, 33, 224): (224, 434),
                (224, 230, 224): (224, 229), (224, 224, 224): (224, 224), (64, 64, 32): (32, 32)}
    for (h, w, size), hw in expected.items():
        assert data.short_side_size(h, w, size) == hw


def normalised(pixels):
    """(T, H, W, 3) values in 0..255 -> (3, T, H, W) CLIP-normalised, written from the rule."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1, 1)
    return (torch.from_numpy(np.array(pixels, dtype=np.float32)).permute(3, 0, 1, 2) / 255 - mean) / std


def test_downscaling_is_bilinear_without_antialias():
    # halving with bilinear, align_corners=False and no antialias samples between each pair of
    # pixels: every output pixel is the mean of a 2x2 block. Stripes two pixels wide therefore
    # come out as clean alternating columns (an antialiased filter would blur them to grey).
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    frames[:, :, 2::4] = frames[:, :, 3::4] = 255
    frames[:, 5, :, 1] = 90  # and a row of another colour, averaged with its neighbour
    blocks = frames.astype(np.float32).reshape(2, 32, 2, 32, 2, 3).mean((2, 4))
    torch.testing.assert_close(data.preprocess_video(torch.from_numpy(frames), 32),
                               normalised(blocks), atol=1e-5, rtol=0)


@pytest.mark.parametrize("portrait", [False, True])
def test_centre_crop_offset_is_rounded_half_to_even(portrait):
    # torchvision's video centre crop: offset int(round((length - 224) / 2)), Python's round,
    # so a surplus of 3 starts at 2 and one of 5 also at 2. The long side is already
    # floor(long / 224 * 224) for these lengths, so the resize leaves the pixels untouched.
    for surplus, offset in {1: 0, 3: 2, 5: 2, 7: 4, 31: 16}.items():
        index = np.arange(224 + surplus, dtype=np.uint8)  # each pixel holds its column
        frames = np.broadcast_to(index[None, None, :, None], (1, 224, 224 + surplus, 3))
        if portrait:  # each pixel holds its row
            frames = frames.transpose(0, 2, 1, 3)
        x = data.preprocess_video(torch.from_numpy(np.ascontiguousarray(frames)), 224)
        kept = np.arange(offset, offset + 224, dtype=np.float32)
        kept = kept[None, :, None, None] if portrait else kept[None, None, :, None]
        torch.testing.assert_close(x, normalised(np.broadcast_to(kept, (1, 224, 224, 3))), atol=1e-4, rtol=0)


@pytest.mark.parametrize("hw", [(360, 640), (33, 17)])
def test_video_preprocessing_equals_the_original_transform(hw):
    # written as the original runs it, on (C, T, H, W): divide by 255, normalise FIRST, resize
    # the short side with F.interpolate(bilinear, align_corners=False), crop at
    # int(round((length - 224) / 2)); ours normalises last, which a linear resize allows
    h, w = hw
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, h, w, 3), dtype=np.uint8))
    x = normalised(frames.numpy())  # (3, 8, h, w)
    new_h, new_w = (224, math.floor(w / h * 224)) if h <= w else (math.floor(h / w * 224), 224)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    expected = x[..., top:top + 224, left:left + 224]
    torch.testing.assert_close(data.preprocess_video(frames, 224), expected, atol=2e-5, rtol=0)


def test_clip_normalisation_of_a_uniform_grey_frame():
    v = 100
    x = data.preprocess_video(torch.full((2, 40, 60, 3), v, dtype=torch.uint8), 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = ((v / 255 - mean) / std).view(3, 1, 1, 1).expand(3, 2, 32, 32)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_log_mel_is_kaldi_fbank_with_the_papers_parameters():
    wave = torch.from_numpy(tone(1.3, freq=523) + 0.05)  # an offset, which must be removed
    expected = torchaudio.compliance.kaldi.fbank(
        (wave - wave.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=112, dither=0.0, frame_length=25, frame_shift=10)
    got = data.log_mel(wave, 112)
    assert got.shape == (1 + (len(wave) - 400) // 160, 112)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_log_mel_of_a_stereo_wave_is_its_first_channel_less_the_whole_mean():
    # the original subtracts the mean of the whole (C, N) tensor, then Kaldi's fbank reads
    # channel 0: the left channel's spectrogram, not the mix's
    rng = np.random.default_rng(0)
    left = torch.from_numpy(tone(1.0, freq=523) + 0.05)
    right = torch.from_numpy(rng.normal(0.2, 0.3, 16000).astype(np.float32))
    whole_mean = (left.sum() + right.sum()) / 32000
    expected = torchaudio.compliance.kaldi.fbank(
        (left - whole_mean)[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=112, dither=0.0, frame_length=25, frame_shift=10)
    got = data.log_mel(torch.stack([left, right]), 112)
    # float32 means summed in another order differ in the last bits; quiet bins magnify that
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    mix = data.log_mel((left + right) / 2, 112)
    assert (got - mix).abs().max() > 1


def test_audio_preprocessing_of_a_stereo_file_equals_the_original(tmp_path):
    # the whole audio path from a 44.1 kHz stereo wav, written as the original runs it: load
    # every channel, torchaudio resample to 16 kHz, subtract the mean of everything, fbank
    # (channel 0), repeat to length, normalise (1 s = 98 frames, so no chunk choice is involved)
    left, right = tone(1.0, freq=440, rate=44100), tone(1.0, freq=3000, amplitude=0.3, rate=44100)
    path = tmp_path / "clip.mp4"
    data.write_clip(str(path), np.zeros((8, 32, 32, 3), np.uint8), None)
    samples = pcm_wav(tmp_path / "clip.wav", np.stack([left, right]), 44100)  # the sidecar
    wave = torchaudio.functional.resample(samples, 44100, 16000)
    spec = torchaudio.compliance.kaldi.fbank(
        wave - wave.mean(), htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=32, dither=0.0, frame_length=25, frame_shift=10)
    assert spec.shape == (98, 32)
    expected = ((spec[torch.arange(128) % 98].T + 4.2677393) / (4.5689974 * 2)).expand(3, 32, 128)
    got = data.preprocess_audio(data.read_audio(str(path)), 32, 128)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def in_third(start, k, n, L):
    """Whether `start` lies in the k-th of three equal parts of the valid starts [0, n - L]."""
    m = n - L + 1
    return k * m <= 3 * start < (k + 1) * m


@pytest.mark.parametrize("train", [False, True])
def test_three_chunk_rule_for_long_spectrograms(train):
    n, L = 1198, 1036  # a 12 s clip at the paper's sizes
    for seed in range(20 if train else 1):
        starts = data.chunk_starts(n, L, train, torch.Generator().manual_seed(seed))
        assert len(starts) == 3 and all(in_third(s, k, n, L) for k, s in enumerate(starts))


def test_audio_chunks_are_the_spectrogram_at_the_chosen_starts():
    wave = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, 3 * 16000).astype(np.float32))
    spec = data.log_mel(wave, 32)  # (298, 32)
    starts = data.chunk_starts(spec.shape[0], 128, True, torch.Generator().manual_seed(5))
    x = data.preprocess_audio(wave, 32, 128, True, torch.Generator().manual_seed(5))
    for k, s in enumerate(starts):
        torch.testing.assert_close(x[k], (spec[s:s + 128].T + 4.2677393) / (4.5689974 * 2))


def test_short_spectrogram_is_repeated_to_length():
    wave = torch.from_numpy(tone(0.5, freq=300))  # 48 frames, 128 wanted
    spec = data.log_mel(wave, 32)
    assert spec.shape[0] == 48
    x = data.preprocess_audio(wave, 32, 128)
    expected = (spec[torch.arange(128) % 48].T + 4.2677393) / (4.5689974 * 2)
    for k in range(3):
        torch.testing.assert_close(x[k], expected)
    assert data.chunk_starts(48, 128, True) == [0, 0, 0]


def test_evaluation_preprocessing_is_deterministic(small_set):
    ann, root = small_set
    first = data.AVCaptionDataset(ann, root, TINY)[0]
    again = data.AVCaptionDataset(ann, root, TINY, seed=7)[0]
    assert torch.equal(first["video"], again["video"]) and torch.equal(first["audio"], again["audio"])


def test_training_flips_sometimes(small_set):
    ann, root = small_set
    plain = data.AVCaptionDataset(ann, root, TINY)[0]["video"]
    flips = []
    for seed in range(8):
        video = data.AVCaptionDataset(ann, root, TINY, train=True, seed=seed)[0]["video"]
        if torch.equal(video, plain):
            flips.append(False)
        else:
            assert torch.equal(video, plain.flip(-1)), "training changed the frames beyond a flip"
            flips.append(True)
    assert any(flips) and not all(flips)


def test_the_originals_random_evaluation_is_one_flag_each(small_set):
    # the original flips and draws the audio chunks at random in evaluation too; ours does
    # neither unless MediaConfig says so (the dataset's per-item generator still seeds it)
    ann, root = small_set
    # a window shorter than the 2 s clips, so there are chunk starts to draw from (the tiny
    # preset's window holds a whole embedded clip)
    short = data.MediaConfig(**{**vars(TINY), "target_length": 128})
    plain = data.AVCaptionDataset(ann, root, short)[0]
    original = data.MediaConfig(**{**vars(short), "flip_in_eval": True, "random_chunks_in_eval": True})
    items = [data.AVCaptionDataset(ann, root, original, seed=seed)[0] for seed in range(8)]
    flipped = [not torch.equal(item["video"], plain["video"]) for item in items]
    assert any(flipped) and not all(flipped)
    assert all(torch.equal(item["video"], plain["video"].flip(-1)) for item, f in zip(items, flipped) if f)
    assert any(not torch.equal(item["audio"], plain["audio"]) for item in items)


# -----------------------------------------------------------------------------
# 4. The embedded dataset generator


@pytest.fixture(scope="module")
def two_generated_sets(tmp_path_factory):
    roots = []
    for name in ("one", "two"):
        root = str(tmp_path_factory.mktemp(name))
        data.make_embedded_dataset(root, splits={"train": 4, "val": 2}, seed=3, progress=False)
        roots.append(root)
    return roots


def test_generator_is_deterministic(two_generated_sets):
    one, two = two_generated_sets
    for split, count in (("train", 4), ("val", 2)):
        text = open(os.path.join(one, f"{split}.json")).read()
        assert text == open(os.path.join(two, f"{split}.json")).read()
        records = json.loads(text)
        assert len(records) == count
        for rec in records:
            a, b = (os.path.join(root, f"{rec['id']}.mp4") for root in (one, two))
            assert torch.equal(data.read_video_frames_decode_all(a, 16), data.read_video_frames_decode_all(b, 16))
            assert torch.equal(data.read_audio(a), data.read_audio(b))


def test_every_caption_parses_back_to_its_attributes(two_generated_sets):
    records = [r for split in ("train", "val")
               for r in json.load(open(os.path.join(two_generated_sets[0], f"{split}.json")))]
    seen = [r["attributes"] for r in records]
    every = [dict(zip(data.ATTRIBUTES, values)) for values in itertools.product(*data.ATTRIBUTES.values())]
    assert len(every) == 3 * 4 * 4 * 4
    for a in seen + every:
        captions = data.captions_for(a)
        assert data.parse_attributes(captions["caption"]) == a
        assert data.parse_attributes(captions["caption_video"]) == {
            "shape": a["shape"], "colour": a["colour"], "motion": a["motion"], "background": None}
        assert data.parse_attributes(captions["caption_audio"]) == {
            "shape": a["shape"], "colour": None, "motion": None, "background": a["background"]}
    for r in records:  # the stored captions are the ones made from the stored attributes
        assert data.parse_attributes(r["caption"]) == r["attributes"]
        assert {k: r[k] for k in ("caption", "caption_video", "caption_audio")} == data.captions_for(r["attributes"])


def test_embedded_events_are_seen_in_their_frame_and_heard_in_their_slot(two_generated_sets):
    """What ties a clip's video to its own soundtrack: in each lit slot the background of
    the tiny preset's frame for that slot lights up and the spectrogram's slot is louder."""
    root = two_generated_sets[0]
    for rec in json.load(open(os.path.join(root, "train.json"))):
        lit = torch.tensor(rec["events"]["slots"], dtype=torch.bool)
        assert lit.sum() == data.EVENT_LIT
        path = os.path.join(root, f"{rec['id']}.mp4")
        frames = data.read_video_frames(path, TINY.num_frames)  # (8, H, W, 3): one per slot
        corner = frames[:, :4, :4].float().mean(dim=(1, 2, 3))  # the background, never the shape
        assert corner[lit].min() > corner[~lit].max() + 40
        spec = data.log_mel(data.read_audio(path), TINY.num_mel_bins)  # (203, mel): the whole clip
        assert spec.size(0) <= TINY.target_length  # one window holds it: no chunk is cut out
        per_slot = torch.stack([spec[25 * k + 3:25 * k + 18].mean() for k in range(data.EVENT_SLOTS)])
        assert per_slot[lit].min() > per_slot[~lit].max()


def test_an_older_copy_of_the_embedded_set_is_rebuilt_not_mixed(tmp_path, monkeypatch):
    root = str(tmp_path / "embedded")
    small = {"train": 2, "val": 1, "test": 1}
    monkeypatch.setattr(data, "SPLITS", small)
    data.make_embedded_dataset(root, small, progress=False)
    made = open(os.path.join(root, "train.json")).read()
    # what version 1 left: its marker, and a clip this version does not make
    json.dump({"seed": 0, "splits": small}, open(os.path.join(root, "COMPLETE"), "w"))
    open(os.path.join(root, "train_09999.mp4"), "wb").close()
    data.ensure_embedded_dataset(root)
    assert json.load(open(os.path.join(root, "COMPLETE")))["version"] == data.DATASET_VERSION
    assert not os.path.exists(os.path.join(root, "train_09999.mp4"))
    assert open(os.path.join(root, "train.json")).read() == made


AFTER_THREADS = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
from tqdm import tqdm
import data

FORKS = []  # every os.fork() of this process (spawn and the fork server's own forks are not)


def read(batch):  # a collate function of the script that runs: the workers import it
    return data.read_video_frames(batch[0], 8)


if __name__ == "__main__":
    os.register_at_fork(before=lambda: FORKS.append(1))
    # threads, as a test session or a caller has run them before: torch's intra-op pool,
    # FFmpeg's decoder threads, tqdm's monitor
    torch.set_num_threads(2)
    torch.randn(256, 256) @ torch.randn(256, 256)
    data.read_video_frames({clip!r}, 8)
    for _ in tqdm(range(3), mininterval=0, disable=False):
        pass
{work}
    print("forks", len(FORKS))
"""


def run_after_threads(tmp_path, work):
    """Run `work` (script lines) in a fresh interpreter that has first run threads, under a time
    limit that fails the test instead of hanging it; returns what it printed."""
    import subprocess
    import sys
    clip = str(tmp_path / "a.mp4")
    data.write_test_clip(clip, seconds=1, width=64, height=64)
    script = tmp_path / "after_threads.py"
    script.write_text(AFTER_THREADS.format(repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           clip=clip, work=work))
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("hung: a worker process inherited a lock held by a thread of its parent")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_generator_forks_nothing_after_threads_have_run(tmp_path):
    """A test session, or any caller that used torch or decoded a clip, has threads running
    when it generates the embedded dataset: the generator's pool must not be a fork of it (a
    forked child inherits held locks and can hang forever in its first import)."""
    out = run_after_threads(tmp_path, f"""
    root = {str(tmp_path / "clips")!r}
    data.make_embedded_dataset(root, splits={{"train": 4, "val": 2}}, seed=3, workers=2, progress=True)
    print("clips", sum(f.endswith(".mp4") for f in os.listdir(root)))""")
    assert "clips 6" in out and "forks 0" in out, out


def test_loader_workers_decode_after_the_parent_has_and_fork_nothing(tmp_path):
    """The parent decodes first (one file given to sample.py, a cache build, a test), then
    loader workers decode, with a collate function of the running script: none of them is a
    fork of the parent, and they return every frame."""
    out = run_after_threads(tmp_path, f"""
    loader = data.loader([{str(tmp_path / "a.mp4")!r}] * 4, batch_size=1, num_workers=2, collate_fn=read)
    print("frames", sum(len(x) for x in loader))""")
    assert "frames 32" in out and "forks 0" in out, out


# --- captions -> token ids


def test_bert_vocabulary_gets_dec_as_its_last_id(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "Moves"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = data.Tokenizer.from_bert(str(tmp_path))
    assert tok.bos_id == len(words) and tok.vocab_size == len(words) + 1
    ids, mask = tok.encode(["a red circles", "Moves"])
    assert ids[0].tolist() == [tok.bos_id, 5, 6, 7, 8, tok.sep_id]  # cased, [DEC] ... [SEP]
    assert ids[1].tolist() == [tok.bos_id, 9, tok.sep_id, 0, 0, 0] and mask[1].sum() == 3
    assert tok.decode(ids[0, 1:]) == "a red circles"


def test_trained_tokenizer_round_trips_through_its_file(tmp_path):
    captions = ["a red circle moves left", "a blue square moves up over rain"] * 5
    tok = data.Tokenizer.train(captions, vocab_size=200)
    tok.save(str(tmp_path / "tokenizer.json"))
    again = data.Tokenizer.load(str(tmp_path / "tokenizer.json"))
    cfg = again.configure(model.tiny_config())
    assert cfg.qformer.bos_token_id == tok.bos_id and cfg.qformer.vocab_size == tok.vocab_size
    ids, _ = again.encode(captions[:2])
    assert torch.equal(ids, tok.encode(captions[:2])[0])
    assert [again.decode(r[1:]) for r in ids] == captions[:2]


def test_trained_tokenizer_is_the_same_every_time_and_spells_unseen_words():
    """The same captions give the same vocabulary and ids (a run with the same seed trains
    the same); a word left out of a small vocabulary is spelled from its characters."""
    captions = ["a red circle moves left", "a blue square moves up over rain", "Rain!"] * 3
    vocabs = [data.Tokenizer.train(captions, vocab_size=200).tok.get_vocab() for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    tok = data.Tokenizer.train(captions, vocab_size=40)  # specials and characters, then the commonest words
    assert tok.pad_id == 0 and tok.sep_id == 3 and tok.bos_id == 5  # tiny_config's special ids
    assert tok.tok.encode("square", add_special_tokens=False).tokens == ["s", "##q", "##u", "##a", "##r", "##e"]
    assert tok.decode(tok.encode(["a blue square"])[0][0, 1:]) == "a blue square"
