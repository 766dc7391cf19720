"""explain.py's attribution at the tiny preset: it explains the model that captions (the same
log-probabilities), it gives every word of the caption, WordPiece pieces joined, a
non-negative attribution over the memory, and a clip without sound none on the sound."""

import torch

import data
import explain
from model import UniQ4Cap, tiny_config

CAPTIONS = ["a red circle moves up with rain in the background",
            "a blue cross moves down with no background sound"]


def tiny_model_and_tokenizer():
    tokenizer = data.Tokenizer.train(CAPTIONS)
    torch.manual_seed(0)
    return UniQ4Cap(tokenizer.configure(tiny_config())).eval(), tokenizer


def clip_tokens(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, a = net.cfg.video, net.cfg.audio
    video = torch.randn(1, 3, v.num_frames, *v.image_size, generator=g)
    audio = torch.randn(1, 3, *a.image_size, generator=g)
    with torch.no_grad():
        return net.encode(video, audio)


def test_the_attributed_pass_computes_the_captioners_own_log_probabilities():
    """explain.attribute reads the cross-attention maps written out (model.attention_map);
    the logits must be those of the fused path the captioner runs, or it explains another model."""
    net, tokenizer = tiny_model_and_tokenizer()
    memory, mask = net.memory(*clip_tokens(net))
    ids, _ = tokenizer.encode(CAPTIONS[:1])
    with torch.no_grad():
        plain, _ = net.Qformer.decode_text(ids, net.Qformer.read_memory(net.query_tokens, memory, mask))
        for a in explain.cross_attentions(net):
            a.keep_map = True
        kept, _ = net.Qformer.decode_text(ids, net.Qformer.read_memory(net.query_tokens, memory, mask))
    assert all(a.map is not None and a.map.shape[-1] == memory.size(1) for a in explain.cross_attentions(net))
    torch.testing.assert_close(kept, plain, atol=1e-5, rtol=1e-5)


def test_every_word_gets_a_non_negative_attribution_and_pieces_make_one_word():
    net, tokenizer = tiny_model_and_tokenizer()
    video_tokens, audio_tokens = clip_tokens(net)
    caption = "a red racoon moves up"  # "racoon" is not in the vocabulary: spelt in ## pieces
    ids = tokenizer.encode([caption])[0][0][1:]  # without [DEC]
    assert len(explain.caption_tokens(tokenizer, ids)) > len(caption.split())
    explained, num_video = explain.explain_clip(net, tokenizer, ids, video_tokens, audio_tokens)
    assert [w for w, _, _ in explained] == caption.split()
    memory_size = video_tokens.size(1) + audio_tokens.size(1)
    assert num_video == video_tokens.size(1)
    for _, r, share in explained:
        assert r.shape == (memory_size,) and (r >= 0).all() and r.sum() > 0
        assert 0 < share < 1  # both modalities are read by an untrained model


def test_a_clip_without_sound_puts_every_word_on_the_frames():
    net, tokenizer = tiny_model_and_tokenizer()
    video_tokens, audio_tokens = clip_tokens(net)
    ids = tokenizer.encode(CAPTIONS[1:])[0][0][1:]
    explained, num_video = explain.explain_clip(net, tokenizer, ids, video_tokens, audio_tokens,
                                                audio_mask=torch.tensor([False]))
    for _, r, share in explained:
        assert share == 1.0 and (r[num_video:] == 0).all()


def test_pictures_of_files_with_one_name_in_two_folders_do_not_overwrite_each_other():
    names = explain.picture_names(["a/clip.mp4", "b/clip.mp4", "b/other.mp4"], "out")
    assert names == {"a/clip.mp4": "out/clip.mp4.png", "b/clip.mp4": "out/clip.mp4-2.png",
                     "b/other.mp4": "out/other.mp4.png"}
