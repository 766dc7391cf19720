"""The frozen-feature cache (cache.py): training from it gives the loss training from pixels
gives (within fp16), and anything the features depend on -- encoder weights, preprocessing,
the media file -- invalidates what it stored."""

import json
import os
import shutil
import wave

import numpy as np
import pytest
import torch

import cache
import data
import model as M

SPLITS = {"train": 6}


@pytest.fixture()
def clips(tmp_path):
    root = str(tmp_path / "clips")
    data.make_embedded_dataset(root, SPLITS, workers=1, progress=False)
    return root


def setup(clips, tmp_path, seed=0, media=None):
    torch.manual_seed(seed)
    cfg = M.tiny_config()
    net = M.UniQ4Cap(cfg).eval()  # eval: no Q-Former dropout, so two forwards can be compared
    media = media or data.MediaConfig.from_model(cfg)
    ds = data.AVCaptionDataset(os.path.join(clips, "train.json"), clips, media)
    fingerprint = cache.encoder_fingerprint({"video": net.video_encoder, "audio": net.audio_encoder},
                                            "video+audio", torch.float32)
    fc = cache.FeatureCache(str(tmp_path / "cache"), ds, cfg, fingerprint)
    return net, ds, fc


def build(net, fc):
    return fc.build(net, torch.device("cpu"), torch.autocast("cpu", enabled=False), batch_size=4)


def test_loss_from_the_cache_equals_the_loss_from_pixels(clips, tmp_path):
    net, ds, fc = setup(clips, tmp_path)
    assert build(net, fc) == 6
    pixels, tokens = data.collate([ds[i] for i in range(6)]), data.collate([fc[i] for i in range(6)])
    assert tokens["video"].dtype == torch.float16
    assert tokens["video"].shape == (6, net.cfg.video.num_frames * net.cfg.video.tokens_per_frame, 64)
    with torch.no_grad():
        video, audio = net.encode(pixels["video"], pixels["audio"])
        # fp16 keeps 11 significant bits: a relative error of at most 2^-11 per value
        torch.testing.assert_close(tokens["video"].float(), video, rtol=2 ** -11, atol=1e-6)
        torch.testing.assert_close(tokens["audio"].float(), audio, rtol=2 ** -11, atol=1e-6)
        ids = torch.randint(5, 100, (6, 10))
        _, loss_pixels = net(pixels["video"], pixels["audio"], ids)
        _, loss_cached = net(captions=ids, video_tokens=tokens["video"].float(), audio_tokens=tokens["audio"].float())
    assert torch.isclose(loss_pixels, loss_cached, rtol=1e-4, atol=0), (loss_pixels, loss_cached)


def test_building_leaves_the_random_generator_alone(clips, tmp_path):
    """A run trains the same whether or not it had to build its cache first."""
    net, _, fc = setup(clips, tmp_path)
    before = torch.get_rng_state()
    fc.build(net, torch.device("cpu"), torch.autocast("cpu", enabled=False), batch_size=4, num_workers=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_second_run_reuses_the_cache(clips, tmp_path):
    net, _, fc = setup(clips, tmp_path)
    build(net, fc)
    net, _, again = setup(clips, tmp_path)
    assert again.dir == fc.dir and build(net, again) == 0


def test_other_encoder_weights_or_preprocessing_use_another_cache(clips, tmp_path):
    _, _, fc = setup(clips, tmp_path)
    _, _, other_weights = setup(clips, tmp_path, seed=1)
    cfg = M.tiny_config()
    media = data.MediaConfig.from_model(cfg)
    media.target_length += 8
    _, _, other_media = setup(clips, tmp_path, media=media)
    assert len({fc.dir, other_weights.dir, other_media.dir}) == 3


def test_a_weights_file_is_fingerprinted_by_its_bytes_without_building_the_tower(tmp_path):
    """The fingerprint of a tower given as a file reads the file, not a built tower: a run
    whose caches are complete never builds the towers (train_caption.py). Another file, or
    the same file for another tower configuration, is another fingerprint."""
    cfg = M.tiny_config()
    tower = M.VisionTransformer(cfg.video)
    path = str(tmp_path / "video.pth")
    torch.save(tower.state_dict(), path)
    same = cache.encoder_fingerprint({"video": (path, cfg.video)}, "video", torch.float32)
    assert cache.encoder_fingerprint({"video": (path, cfg.video)}, "video", torch.float32) == same
    wider = M.tiny_config().video
    wider.num_frames += 1
    assert cache.encoder_fingerprint({"video": (path, wider)}, "video", torch.float32) != same
    with torch.no_grad():
        tower.post_layernorm.weight.add_(1e-3)
    torch.save(tower.state_dict(), path)
    assert cache.encoder_fingerprint({"video": (path, cfg.video)}, "video", torch.float32) != same


def test_a_changed_file_is_computed_again_and_only_it(clips, tmp_path):
    net, ds, fc = setup(clips, tmp_path)
    build(net, fc)
    before = fc[2]["video"].clone()
    # clip 2 now holds clip 3's media: same size class, different content and mtime
    shutil.copy(os.path.join(clips, "train_00003.mp4"), os.path.join(clips, "train_00002.mp4"))
    assert fc.stale() == [2]
    assert build(net, fc) == 1
    assert not torch.equal(fc[2]["video"], before)
    assert torch.equal(fc[2]["video"], fc[3]["video"])


def test_a_new_sidecar_wav_is_computed_again(clips, tmp_path):
    net, ds, fc = setup(clips, tmp_path)
    build(net, fc)
    before = fc[4]["audio"].clone()
    # clip 4 now takes its sound from a sidecar .wav holding clip 5's soundtrack
    samples = (data.read_audio(os.path.join(clips, "train_00005.mp4")).numpy() * 32767).astype(np.int16)
    with wave.open(os.path.join(clips, "train_00004.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(data.SAMPLE_RATE)
        f.writeframes(samples.tobytes())
    assert fc.stale() == [4]
    assert build(net, fc) == 1
    assert not torch.equal(fc[4]["audio"], before)
    with torch.no_grad():  # the row is what the encoder makes of the sound the dataset now reads
        _, audio = net.encode(audio=ds[4]["audio"][None])
    torch.testing.assert_close(fc[4]["audio"].float(), audio[0], rtol=2 ** -11, atol=1e-6)


def test_an_interrupted_build_finishes_what_is_missing(clips, tmp_path):
    net, _, fc = setup(clips, tmp_path)
    build(net, fc)
    done = fc[4]["audio"].clone()
    (shard,) = os.listdir(fc.dir)
    rows = os.path.join(fc.dir, shard, "rows.jsonl")
    with open(rows) as f:
        lines = f.readlines()
    with open(rows, "w") as f:  # as if the run had died before committing clips 1 and 4, mid-line
        f.writelines(l for l in lines if json.loads(l)["path"] not in (fc.paths[1], fc.paths[4]))
        f.write('{"path": "')
    net, _, fc = setup(clips, tmp_path)
    assert fc.stale() == [1, 4] and build(net, fc) == 2
    assert torch.equal(fc[4]["audio"], done)


def subset(clips, name, order):
    """An annotation file of the train clips at `order`: another list over the same files."""
    with open(os.path.join(clips, "train.json")) as f:
        records = json.load(f)
    with open(os.path.join(clips, name), "w") as f:
        json.dump([records[i] for i in order], f)
    return os.path.join(clips, name)


def test_a_list_that_gains_a_clip_computes_that_clip_alone(clips, tmp_path):
    """Entries belong to clips, not to the list that asked for them: a list that gains a
    clip computes one entry, and a list that reorders or filters clips already stored (another
    split, a filtered training list) computes none and reads the same features."""
    net, ds, full = setup(clips, tmp_path)
    media = data.MediaConfig.from_model(net.cfg)
    fingerprint = cache.encoder_fingerprint({"video": net.video_encoder, "audio": net.audio_encoder},
                                            "video+audio", torch.float32)

    def cache_for(ann):
        return cache.FeatureCache(str(tmp_path / "cache"), data.AVCaptionDataset(ann, clips, media), net.cfg,
                                  fingerprint)

    assert build(net, cache_for(subset(clips, "five.json", range(5)))) == 5
    assert build(net, full) == 1  # the sixth clip only
    other = cache_for(subset(clips, "other.json", [5, 3, 1]))
    assert other.dir == full.dir and build(net, other) == 0
    assert torch.equal(other[0]["video"], full[5]["video"]) and torch.equal(other[2]["audio"], full[1]["audio"])
    assert len(os.listdir(full.dir)) == 2  # one shard per build that computed something


def test_a_cache_in_the_layout_of_an_earlier_version_is_named_and_computed_again(clips, tmp_path, capsys):
    old = tmp_path / "cache" / "0123456789abcdef0123"  # version 3: one folder per clip list
    old.mkdir(parents=True)
    np.save(old / "state.npy", np.ones(6, np.int8))
    net, _, fc = setup(clips, tmp_path)
    assert build(net, fc) == 6
    out = capsys.readouterr().out
    assert "layout of an earlier version" in out and "0123456789abcdef0123" in out and "computed again" in out
    shutil.rmtree(fc.dir)  # another split of the same run: the folder is not named twice
    assert build(net, fc) == 6 and "earlier version" not in capsys.readouterr().out


def test_unreadable_and_silent_clips(clips, tmp_path):
    open(os.path.join(clips, "train_00000.mp4"), "wb").close()  # zero bytes
    data.write_clip(os.path.join(clips, "train_00001.mp4"), np.zeros((16, 64, 64, 3), np.uint8), None)
    net, _, fc = setup(clips, tmp_path)
    build(net, fc)
    assert fc[0]["error"] == (os.path.join(clips, "train_00000.mp4"), "empty file")
    assert fc[1]["audio_missing"] and "audio" not in fc[1]
    batch = data.collate([fc[i] for i in range(6)])
    assert batch["ids"][0] == "train_00001" and batch["audio_mask"].tolist() == [False, True, True, True, True]


def test_records_sharing_a_clip_share_a_row(clips, tmp_path):
    ann = os.path.join(clips, "train.json")
    with open(ann) as f:
        records = json.load(f)
    with open(ann, "w") as f:  # a second caption for clip 0, as MSR-VTT has twenty per video
        json.dump(records + [dict(records[0], caption="another caption")], f)
    net, ds, fc = setup(clips, tmp_path)
    assert len(fc) == 7 and len(fc.clips) == 6
    assert build(net, fc) == 6
    assert torch.equal(fc[6]["video"], fc[0]["video"]) and fc[6]["caption"] == "another caption"


def test_training_augmentation_cannot_be_cached(clips, tmp_path):
    cfg = M.tiny_config()
    ds = data.AVCaptionDataset(os.path.join(clips, "train.json"), clips, data.MediaConfig.from_model(cfg), train=True)
    with pytest.raises(ValueError, match="evaluation-mode"):
        cache.FeatureCache(str(tmp_path), ds, cfg, "x")
