"""The model's properties at the tiny preset: shapes, attention paths, masks, cached
generation, the loss at initialisation, and that a batch can be learned."""

import math

import pytest
import torch

from model import UniQ4Cap, filter_top_k_top_p, set_attention_impl, tiny_config


def make_batch(cfg, B=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, a = cfg.video, cfg.audio
    video = torch.randn(B, 3, v.num_frames, *v.image_size, generator=g)
    audio = torch.randn(B, 3, *a.image_size, generator=g)
    q = cfg.qformer
    captions = torch.randint(6, q.vocab_size, (B, T), generator=g)
    captions[:, 0] = q.bos_token_id
    captions[:, -1] = q.sep_token_id
    return video, audio, captions, torch.ones(B, T, dtype=torch.bool)


def query_kv(model, video, audio):
    """forward's first three steps: encode, memory, the queries read it -> per layer (k, v)."""
    memory, memory_mask = model.memory(*model.encode(video, audio))
    return model.Qformer.read_memory(model.query_tokens, memory, memory_mask)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UniQ4Cap(tiny_config()).eval()


def test_module_shapes(model):
    cfg = model.cfg
    video, audio, captions, mask = make_batch(cfg)
    hidden, frames = model.video_encoder(video)
    assert hidden.shape == (2, cfg.video.num_frames * cfg.video.tokens_per_frame, cfg.video.width)
    assert frames.shape == (2, cfg.video.num_frames, cfg.video.width)
    hidden, frames = model.audio_encoder(audio)
    assert hidden.shape == (2, cfg.audio.tokens_per_frame, cfg.audio.width)
    assert frames.shape == (2, 1, cfg.audio.width)
    v, a = model.encode(video, audio)
    memory, memory_mask = model.memory(v, a)
    assert memory.shape == (2, v.size(1) + a.size(1), cfg.qformer.encoder_width)
    assert memory_mask is None
    cache = model.Qformer.read_memory(model.query_tokens, memory, memory_mask)
    head_dim = cfg.qformer.hidden // cfg.qformer.heads
    assert len(cache) == cfg.qformer.layers
    assert cache[0][0].shape == (2, cfg.qformer.heads, cfg.qformer.num_query_tokens, head_dim)
    logits, loss = model(video, audio, captions, mask)
    assert logits.shape == (2, captions.size(1), cfg.qformer.vocab_size) and loss.dim() == 0


def test_patch_dropout_keeps_same_positions_in_every_frame():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = UniQ4Cap(cfg, freeze_encoders=False).train()
    video = torch.randn(2, 3, cfg.video.num_frames, *cfg.video.image_size)
    x = torch.arange(2 * cfg.video.num_frames * cfg.video.tokens_per_frame, dtype=torch.float)
    x = x.view(2 * cfg.video.num_frames, cfg.video.tokens_per_frame, 1)
    kept = model.video_encoder.drop_patches(x, B=2, T=cfg.video.num_frames)
    keep = int(cfg.video.num_patches * (1 - cfg.video.patch_dropout))
    assert kept.shape == (2 * cfg.video.num_frames, 1 + keep, 1)
    positions = (kept[:, :, 0] % cfg.video.tokens_per_frame).view(2, cfg.video.num_frames, -1)
    assert (positions[:, :, 0] == 0).all()  # the class token always stays
    assert (positions == positions[:, :1]).all()  # same patches in every frame of a clip
    hidden, _ = model.video_encoder(video)
    assert hidden.size(1) == cfg.video.num_frames * (1 + keep)
    model.eval()
    assert model.video_encoder(video)[0].size(1) == cfg.video.num_frames * cfg.video.tokens_per_frame


def test_frozen_encoders_stay_in_eval_mode():
    model = UniQ4Cap(tiny_config()).train()
    assert not model.video_encoder.training and not model.audio_encoder.training
    assert model.Qformer.training
    assert all(not p.requires_grad for p in model.encoder_parameters())


def test_sdpa_equals_plain_attention(model):
    video, audio, captions, mask = make_batch(model.cfg)
    mask[1, 5:] = False  # padding exercises the text mask
    audio_mask = torch.tensor([True, False])  # and the memory mask
    set_attention_impl(model, "sdpa")
    fast, _ = model(video, audio, captions, mask, audio_mask=audio_mask)
    set_attention_impl(model, "plain")
    plain, _ = model(video, audio, captions, mask, audio_mask=audio_mask)
    set_attention_impl(model, "auto")
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_later_text_never_changes_earlier_logits(model):
    video, audio, captions, mask = make_batch(model.cfg, B=1)
    logits, _ = model(video, audio, captions, mask)
    changed = captions.clone()
    changed[0, 5:] = (changed[0, 5:] + 7) % model.cfg.qformer.vocab_size
    logits2, _ = model(video, audio, changed, mask)
    torch.testing.assert_close(logits[:, :5], logits2[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(logits[:, 5:], logits2[:, 5:])


def test_query_cache_does_not_depend_on_text(model):
    """The queries run before (and without) any text: their cached keys/values are a
    function of the memory alone, so the text can only read them."""
    video, audio, captions, mask = make_batch(model.cfg)
    cache1 = query_kv(model, video, audio)
    cache2 = query_kv(model, video, audio)
    # and the text pass leaves the query cache untouched: text keys are appended after it
    _, grown = model.Qformer.decode_text(captions, cache1, mask)
    Q = model.cfg.qformer.num_query_tokens
    for (k, v), (gk, gv) in zip(cache2, grown):
        torch.testing.assert_close(gk[:, :, :Q], k)
        torch.testing.assert_close(gv[:, :, :Q], v)


def every_layer_reading_the_memory():
    """The tiny preset with cross-attention in every layer, the last one included (the
    layout the tiny preset had before it was found dead there)."""
    cfg = tiny_config()
    cfg.qformer.cross_attention_freq = 1
    torch.manual_seed(0)
    return UniQ4Cap(cfg).eval()


@pytest.mark.parametrize("layout", ["tiny", "cross-attention in the last layer"])
def test_query_pass_skips_only_what_no_text_reads(model, layout):
    """read_memory stops at the last layer's query keys and values; running that layer's
    whole query path (self-attention output, cross-attention, FFN) gives the same cache."""
    if layout != "tiny":
        model = every_layer_reading_the_memory()
    video, audio, _, _ = make_batch(model.cfg)
    memory, memory_mask = model.memory(*model.encode(video, audio), audio_mask=torch.tensor([True, False]))
    x = model.Qformer.bert.embeddings(queries=model.query_tokens.expand(2, -1, -1))
    full = []
    for layer in model.Qformer.bert.encoder.layer:
        x, kv = layer.forward_queries(x, memory, memory_mask[:, None, None, :])
        full.append(kv)
    for (k, v), (fk, fv) in zip(model.Qformer.read_memory(model.query_tokens, memory, memory_mask), full):
        assert torch.equal(k, fk) and torch.equal(v, fv)


@pytest.mark.parametrize("layout", ["tiny", "cross-attention in the last layer"])
def test_unreachable_parameters_change_no_caption_and_stay_frozen_in_the_state_dict(model, layout):
    """BLIP-2's heads and the last layer's query path: frozen (nothing would train them, and
    DDP stops on a trained parameter without a gradient), yet kept so checkpoints load, and
    whatever they hold, the loss and the captions are the same."""
    if layout != "tiny":
        model = every_layer_reading_the_memory()
    names = {n for n, p in model.named_parameters() if any(p is q for q in model.unreachable_parameters())}
    last = f"Qformer.bert.encoder.layer.{model.cfg.qformer.layers - 1}."
    expected = {"temp", "vision_proj.weight", "itm_head.bias", last + "intermediate_query.dense.weight",
                last + "output_query.LayerNorm.bias"}
    assert expected <= names
    assert any(".crossattention." in n for n in names) == (layout != "tiny")  # the tiny preset reads where it counts
    assert names <= set(model.state_dict())
    assert all(not p.requires_grad for p in model.unreachable_parameters())
    video, audio, captions, mask = make_batch(model.cfg)
    logits, _ = model(video, audio, captions, mask)
    ids = model.generate(video, audio, max_length=10)
    with torch.no_grad():
        for p in model.unreachable_parameters():
            p.normal_()
    torch.testing.assert_close(model(video, audio, captions, mask)[0], logits, atol=0, rtol=0)
    assert torch.equal(model.generate(video, audio, max_length=10), ids)


@pytest.mark.parametrize("lacks", ["nothing", "audio hidden for every clip", "audio absent from the batch",
                                   "video absent from the batch"])
def test_every_trained_parameter_gets_a_gradient_whatever_the_batch_lacks(lacks):
    """What DDP without find_unused_parameters needs: on every rank, every parameter that
    requires grad gets one, even when modality dropout or the data leave a whole micro-batch
    without one modality. That modality's projection then gets an exact zero."""
    torch.manual_seed(0)
    model = UniQ4Cap(tiny_config()).train()
    video, audio, captions, mask = make_batch(model.cfg)
    v, a = model.encode(video, audio)
    inputs = {"video_tokens": v, "audio_tokens": a}
    if lacks == "audio hidden for every clip":
        inputs["audio_mask"] = torch.tensor([False, False])
    elif lacks == "audio absent from the batch":
        inputs["audio_tokens"], inputs["audio_mask"] = None, torch.tensor([False, False])  # as data.collate gives it
    elif lacks == "video absent from the batch":
        inputs["video_tokens"] = None
    _, loss = model(captions=captions, caption_mask=mask, **inputs)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    missing = {"nothing": None, "video absent from the batch": model.video_project}.get(lacks, model.audio_project)
    for proj in (model.video_project, model.audio_project):
        assert (proj.weight.grad.abs().sum() == 0) == (proj is missing)


def test_each_modality_comes_as_pixels_or_as_cached_tokens(model):
    """`encode` is the one place that takes either: cached video tokens beside audio pixels
    give the captioner the same memory as both pixels; one modality given both ways is an error."""
    video, audio, captions, mask = make_batch(model.cfg)
    v, _ = model.encode(video)
    logits, _ = model(video, audio, captions, mask)
    mixed, _ = model(audio=audio, video_tokens=v, captions=captions, caption_mask=mask)
    assert torch.equal(mixed, logits)
    with pytest.raises(ValueError, match="video given twice"):
        model(video, captions=captions, video_tokens=v)


def test_the_towers_can_be_built_later_and_initialise_the_rest_alike():
    """UniQ4Cap(cfg, encoders=False) is the model a run from a complete feature cache trains:
    no towers, and the rest initialised exactly as in a model built with them (the towers
    draw from a generator of their own). build_encoders gives the towers built at once."""
    cfg = tiny_config()
    torch.manual_seed(0)
    whole = UniQ4Cap(cfg).state_dict()
    torch.manual_seed(0)
    net = UniQ4Cap(cfg, encoders=False)
    assert net.video_encoder is None and net.audio_encoder is None
    rest = net.state_dict()
    assert list(rest) == [k for k in whole if not k.startswith(("video_encoder.", "audio_encoder."))]
    assert all(torch.equal(rest[k], whole[k]) for k in rest)
    net.build_encoders()
    assert list(net.state_dict()) == list(whole)  # the towers in their usual place
    assert all(torch.equal(v, whole[k]) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in net.encoder_parameters())


def test_a_model_trained_from_cached_tokens_lets_go_of_its_towers(model):
    """drop_encoders (train_caption.py calls it once the feature cache is built): the towers
    leave the parameters and the state dict, the caption from cached tokens is unchanged, and
    pixels are refused by name."""
    video, audio, captions, mask = make_batch(model.cfg)
    v, a = model.encode(video, audio)
    logits, _ = model(captions=captions, caption_mask=mask, video_tokens=v, audio_tokens=a)
    towers = sum(p.numel() for p in model.encoder_parameters())
    before = model.num_params()
    model.drop_encoders()
    assert model.num_params() == before - towers and model.encoder_parameters() == []
    assert not any(k.startswith(("video_encoder.", "audio_encoder.")) for k in model.state_dict())
    model.train().eval()  # switching modes needs no towers either
    again, _ = model(captions=captions, caption_mask=mask, video_tokens=v, audio_tokens=a)
    assert torch.equal(again, logits)
    with pytest.raises(ValueError, match="has no encoders"):
        model(video, captions=captions, audio_tokens=a)


def test_missing_audio_is_masked_not_noise(model):
    """A clip without audio gives the same captions whatever its (zero-filled) audio holds."""
    video, audio, captions, mask = make_batch(model.cfg)
    audio_mask = torch.tensor([True, False])
    logits1, _ = model(video, audio, captions, mask, audio_mask=audio_mask)
    audio2 = audio.clone()
    audio2[1] = torch.randn_like(audio2[1])
    logits2, _ = model(video, audio2, captions, mask, audio_mask=audio_mask)
    torch.testing.assert_close(logits1[1], logits2[1], atol=1e-6, rtol=0)
    assert not torch.allclose(logits1[0], model(video, audio2 * 0 + 1, captions, mask,
                                                audio_mask=audio_mask)[0][0])


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_cached_generation_equals_uncached(model, method):
    video, audio, _, _ = make_batch(model.cfg, B=3)
    fast = model.generate(video, audio, method=method, max_length=20, num_beams=3)
    slow = model.generate(video, audio, method=method, max_length=20, num_beams=3, use_cache=False)
    assert torch.equal(fast, slow)


def test_generation_options(model):
    cfg = model.cfg.qformer
    video, audio, _, _ = make_batch(model.cfg, B=2)
    out = model.generate(video, audio, method="sample", top_k=5, top_p=0.9, num_captions=3,
                         max_length=12, min_length=4)
    assert out.shape[0] == 6 and out.shape[1] <= 12
    assert not (out[:, :3] == cfg.sep_token_id).any()  # no [SEP] before min_length
    beams = model.generate(video, audio, method="beam", num_beams=4, num_captions=2, max_length=12)
    assert beams.shape[0] == 4


def test_nucleus_filter_always_keeps_the_most_likely_token():
    """top_p 0 (or below the top token's probability) leaves exactly the argmax, as greedy;
    top_p 0.7 keeps the smallest set whose mass reaches it."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    for top_p in (0.0, 1e-6):
        kept = torch.isfinite(filter_top_k_top_p(logits, top_p=top_p))
        assert kept.tolist() == [[False, True, False, False], [False, False, True, False]]
    probs = logits[0].softmax(-1)  # 0.09 0.64 0.24 0.03: the best alone is short of 0.7
    assert probs[1] < 0.7 < probs[1] + probs[2]
    assert torch.isfinite(filter_top_k_top_p(logits[:1], top_p=0.7)).tolist() == [[False, True, True, False]]


def test_repetition_penalty_applies(model):
    """Token 10 is the favourite everywhere and token 11 the runner-up: greedy decoding
    repeats 10, with a penalty it must alternate."""
    with torch.no_grad():
        model.Qformer.cls.predictions.bias[10] = 2.0
        model.Qformer.cls.predictions.bias[11] = 1.5
    video, audio, _, _ = make_batch(model.cfg)
    plain = model.generate(video, audio, max_length=8, min_length=8)
    assert (plain == 10).all()
    penalised = model.generate(video, audio, max_length=8, min_length=8, repetition_penalty=2.0)
    assert (penalised == 11).any() and (penalised[:, 0] == 10).all()


def test_generation_stops_at_sep(model):
    cfg = model.cfg.qformer
    with torch.no_grad():  # make [SEP] the most likely token everywhere
        model.Qformer.cls.predictions.bias[cfg.sep_token_id] = 100.0
    video, audio, _, _ = make_batch(model.cfg)
    out = model.generate(video, audio, max_length=20)
    assert out.shape == (2, 1) and (out == cfg.sep_token_id).all()


def test_loss_at_init_is_log_vocab(model):
    video, audio, captions, mask = make_batch(model.cfg, B=4)
    _, loss = model(video, audio, captions, mask)
    assert abs(loss.item() - math.log(model.cfg.qformer.vocab_size)) < 0.05 * math.log(model.cfg.qformer.vocab_size)


def test_one_batch_can_be_overfit():
    # (seed 1: of seeds 0-9, only 0's draw leaves one clip uncaptioned at 400 steps, two of its
    # noise clips being hard to tell apart through the random towers)
    torch.manual_seed(1)
    cfg = tiny_config()
    model = UniQ4Cap(cfg).train()
    video, audio, captions, mask = make_batch(cfg, B=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    for _ in range(400):  # random frozen encoders: the queries need a while to tell 4 noise clips apart
        _, loss = model(video, audio, captions, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    _, loss = model(video, audio, captions, mask)
    # with label smoothing 0.1 the floor is the smoothed target's entropy, about 1.0 here
    assert loss.item() < 1.5
    out = model.generate(video, audio, max_length=captions.size(1))
    assert torch.equal(out[:, :captions.size(1) - 1], captions[:, 1:])
