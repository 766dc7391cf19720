"""Stage 2 under DDP: the real train_caption.main on two gloo ranks trains like one process
on the same global batch (the stage-1 plumbing test in test_training.py does the same for a
toy model).

What makes the two runs comparable, and why each holds:
  - the ranks' micro-batches together hold the clips of the one process's batch
    (training.EpochSampler interleaves the ranks' shares);
  - modality dropout (on, at 0.5) hides the same modality of the same clip in both runs
    (train_caption.hide_modalities hashes the clip, not a generator's next number);
  - the loss is a token mean per rank and DDP averages the ranks' gradients, which equals
    the global token mean only when the ranks hold as many caption tokens: the captions are
    the embedded set's video captions, five words each ("a red circle moves up");
  - the Q-Former's dropout is off: each rank draws its masks from its own generator, which
    no single process can repeat (this is not a property of DDP);
  - both runs read one feature cache, so their inputs are the same bits;
  - both use the two ranks' vocabulary: the WordPiece trainer numbers its pieces
    differently in each process (which is why train_caption.py trains it on rank 0 only);
  - with the retrieval objectives on, ITC and ITM score every pair against the gathered
    global batch, and the ranks draw ITM's hard negatives for the whole global batch from one
    generator seeded by that batch (losses.hard_negatives), as the one process does.
The runs stop after a few steps with --stop-at (last.pth saved, no evaluation). Each check runs
for captioning alone and for captioning with ITC and ITM.
"""

import os

import numpy as np
import pytest
import torch

import data
import model as M
import train_caption
import training as T
from tests.distributed import launch_local

STEPS, WORLD, B = 3, 2, 4  # 16 training clips: 2 steps an epoch, so the third starts epoch 1


def tiny_without_dropout(vocab_size=1000):
    cfg = M.tiny_config(vocab_size)
    cfg.qformer.dropout = 0.0
    return cfg


def run_stage2(argv):
    """train_caption.main without Q-Former dropout; module level, so launch_local can run it."""
    M.PRESETS["tiny"] = tiny_without_dropout
    return train_caption.main(argv)


@pytest.fixture(scope="module", params=[[], ["--itc-weight", "1", "--itm-weight", "1"]], ids=["caption", "+ITC+ITM"])
def runs(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("ddp-caption")
    clips = str(root / "clips")
    data.make_embedded_dataset(clips, {"train": 16, "val": 2, "test": 2}, workers=1, progress=False)

    def argv(out, batch_size):
        return ["--data-dir", clips, "--out-dir", str(root / out), "--cache-dir", str(root / "cache"),
                "--no-align", "--caption-field", "caption_video",
                "--batch-size", str(batch_size), "--max-steps", "10", "--stop-at", str(STEPS),
                "--eval-every", "100", "--warmup-steps", "2", "--modality-dropout", "0.5",
                "--num-workers", "0", "--device", "cpu", "--cache-features", *request.param]

    ranks = launch_local(run_stage2, argv("two-ranks", B), world_size=WORLD)
    saved = dict(M.PRESETS)
    ranks_vocabulary = data.Tokenizer.load(str(root / "two-ranks" / "tokenizer.json"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(data.Tokenizer, "train", lambda captions, vocab_size: ranks_vocabulary)
            one = run_stage2(argv("one-process", WORLD * B))
    finally:
        M.PRESETS.update(saved)
    weights = {name: T.load_checkpoint(str(root / name / "last.pth"))["model"]
               for name in ("two-ranks", "one-process")}
    return {"ranks": ranks, "one": one, "weights": weights, "clips": clips}


def test_modality_dropout_hides_audio_and_video_of_some_clips_in_epoch_0(runs):
    """Otherwise the comparison below would not exercise it (epoch 0 is steps 1 and 2)."""
    records = data.load_annotations(os.path.join(runs["clips"], "train.json"), "caption_video")
    present = torch.ones(len(records), dtype=torch.bool)
    batch = {"ids": [r["id"] for r in records], "captions": [r["caption_video"] for r in records],
             "epoch": 0, "video_mask": present, "audio_mask": present}
    hidden = train_caption.hide_modalities(batch, 0.5, seed=42)  # --seed's default
    assert not hidden["audio_mask"].all() and not hidden["video_mask"].all()


def test_two_ranks_losses_average_to_the_one_process_losses(runs):
    assert all(len(r) == STEPS for r in runs["ranks"]) and len(runs["one"]) == STEPS
    np.testing.assert_allclose(np.mean(runs["ranks"], axis=0), runs["one"], rtol=0, atol=1e-5)
    assert runs["one"][-1] != runs["one"][0]  # the steps did train


def test_two_ranks_end_with_the_weights_of_one_process(runs):
    two, one = runs["weights"]["two-ranks"], runs["weights"]["one-process"]
    assert two.keys() == one.keys()
    for name, w in one.items():
        torch.testing.assert_close(two[name], w, atol=2e-5, rtol=1e-4, msg=name)
