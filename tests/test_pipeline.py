"""The scripts users run, end to end on a few generated clips: stage 1 resumes exactly,
stage 2 trains and saves, sample.py captions a real mp4 (with and without a soundtrack) and
fails cleanly on a broken one."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import train_align
import train_caption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    data.make_embedded_dataset(str(root), {"train": 24, "val": 4, "test": 6}, workers=1, progress=False)
    return str(root)


def common(clips, out, steps):
    return ["--data-dir", clips, "--out-dir", out, "--max-steps", str(steps), "--batch-size", "4",
            "--num-workers", "0", "--device", "cpu", "--warmup-steps", "2"]


def test_stage1_resume_is_exact(clips, tmp_path):
    """4 steps straight give the same losses as 2 steps, a checkpoint, and 2 resumed steps."""
    straight = train_align.main(common(clips, str(tmp_path / "a"), 4) + ["--eval-max", "4"])
    first = train_align.main(common(clips, str(tmp_path / "b"), 4) + ["--eval-max", "4", "--stop-at", "2"])
    assert not os.path.exists(tmp_path / "b" / "video.pth")  # a stopped run is not finished
    rest = train_align.main(common(clips, str(tmp_path / "b"), 4)
                            + ["--eval-max", "4", "--resume", str(tmp_path / "b" / "ckpt.pt")])
    assert len(straight) == 4 and len(first) == 2 and len(rest) == 2
    np.testing.assert_allclose(first + rest, straight, rtol=0, atol=1e-6)
    assert os.path.exists(tmp_path / "b" / "video.pth") and os.path.exists(tmp_path / "b" / "metrics.json")


def test_resume_from_a_missing_checkpoint_is_an_error(clips, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        train_align.main(common(clips, str(tmp_path), 2) + ["--resume", str(tmp_path / "nothing.pt")])


def test_stage2_trains_from_the_feature_cache(clips, tmp_path):
    args = common(clips, str(tmp_path / "caption"), 2) + ["--eval-every", "2", "--eval-max", "2", "--cache-features",
                                                          "--cache-dir", str(tmp_path / "cache"),
                                                          "--align-dir", str(tmp_path / "no-stage-1")]
    losses = train_caption.main(args)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert len(os.listdir(tmp_path / "cache")) == 3  # train, val and test
    assert os.path.exists(tmp_path / "caption" / "metrics.json")


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_train_save_and_caption_a_video(clips, tmp_path):
    out = str(tmp_path / "caption")
    train_caption.main(common(clips, out, 3) + ["--eval-every", "3", "--eval-max", "2", "--no-cache-features",
                                                "--align-dir", str(tmp_path / "no-stage-1")])
    ckpt = os.path.join(out, "best.pth")
    assert os.path.exists(ckpt) and os.path.exists(os.path.join(out, "metrics.json"))

    video = os.path.join(clips, "test_00028.mp4")
    r = run_sample("--video", video, "--ckpt", ckpt, "--max-length", "8")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and r.stdout.strip()  # one caption, printed

    # a clip without a soundtrack: captioned from the frames, and the output says so
    silent = str(tmp_path / "silent.mp4")
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    data.write_clip(silent, frames, None)
    r = run_sample("--video", silent, "--ckpt", ckpt, "--max-length", "8")
    assert r.returncode == 0, r.stderr
    assert "no audio track" in r.stdout

    # an unreadable file: one line naming it, non-zero exit, no traceback
    broken = str(tmp_path / "broken.mp4")
    with open(broken, "wb") as f:
        f.write(os.urandom(2000))
    r = run_sample("--video", broken, video, "--ckpt", ckpt, "--max-length", "8")
    assert r.returncode != 0
    assert "broken.mp4" in r.stderr and "Traceback" not in r.stderr
    assert '"captions"' in r.stdout  # the readable file still gets its JSON line
