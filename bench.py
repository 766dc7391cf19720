"""Speed as a measured property: every figure is a ratio against a baseline measured in the
same run (absolute times on shared machines are noise), medians over repeats.

Rows:
  qformer-step    Q-Former training step (fwd+bwd) at the paper's shapes: SDPA vs the plain
                  softmax(QK^T)V path, fp32 and bf16 (and on CUDA when present)
  peer            our Q-Former step vs transformers' (Blip2QFormerModel + BERT's LM head) on the
                  same weights and memory, its SDPA and eager attention, fp32 and bf16, after
                  checking the outputs agree
  cached-step     stage-2 step from cached encoder features vs recomputing the frozen encoders
  kv-cache        greedy generation of 30 tokens with the KV cache vs without (same tokens)
  decode          8 frames + audio from 10 s and 60 s 720p H.264 clips: our decoder (seeking)
                  vs decoding every frame
  mfu             achieved FLOP/s of the training step vs the matmul peak measured in this run
                  (the Q-Former step is the whole stage-2 step when features are cached)
  cache-read      batches read from a feature cache at the paper's shapes, cold and from the
                  page cache, vs the cached-feature step they feed (>= 1x: the loader keeps pace)
  memory          peak memory of a process that builds the full preset and takes two cached
                  stage-2 steps, the frozen towers built vs never built (a run whose feature
                  cache is complete), each in a fresh process
  train-step      (CUDA, or when named) the whole cached stage-2 step, bf16, at batch 16, 32, ...
                  until memory runs out, then torch.compile at the batch with the most clips/s,
                  and the paper's step from pixels there: clips/s, MFU, peak memory; and the
                  cache loader at that batch with 2, 4, 8, 16 workers against the best step
  sample          sample.py on 256 embedded clips (tiny): batched, decoding in loader workers, vs
                  one clip at a time; and whether decoding or the model bounds it
  isa             (when named) the tiny main job's two steps (stage 1 at batch 128, stage 2 from
                  the cache at batch 32), each in a fresh process: as this CPU runs them, then with
                  PyTorch, MKL and oneDNN held to AVX2 code paths: what the instruction set alone
                  costs on an AVX2-only CPU (x86 only; elsewhere the variables change nothing)
  rank-gallery    text->clip ranking of a gallery with the retrieval heads, clip features stored:
                  ITC as one matrix product then ITM on each text's top k (retrieve.py) vs ITM
                  on every (text, clip) pair

    python bench.py                       # everything on the CPU (and CUDA if present)
    python bench.py --only qformer-step --device cuda --batch 16
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import cache
import data
import model as M
from losses import caption_loss
import retrieve
import sample
import train_align
import train_caption
import training as T
from training import autocast_context


def compare(fns, repeats, warmup=1, sync=lambda: None):
    """Median seconds of each fn in `fns` (name -> callable), run in turns (a, b, a, b, ...)
    so that drift in the machine's speed hits every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timeit(fn, repeats, warmup=1, sync=lambda: None):
    return compare({"fn": fn}, repeats, warmup, sync)["fn"]


def syncer(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# -----------------------------------------------------------------------------
# FLOPs, counted analytically (a multiply-add = 2 FLOPs; backward = 2x forward, except where
# the input needs no gradient, where only the weight gradient is computed)


def qformer_step_flops(cfg, batch, text_len, memory_len):
    q = cfg.qformer
    C, I, W, Q, T, M_, V = q.hidden, q.intermediate, q.encoder_width, q.num_query_tokens, text_len, memory_len, q.vocab_size
    fwd = 0
    for i in range(q.layers):
        fwd += 2 * Q * C * C * 4 + 2 * 2 * Q * Q * C + 2 * 2 * Q * C * I  # queries: self-attn, FFN
        if i % q.cross_attention_freq == 0:
            fwd += 2 * Q * C * C * 2 + 2 * 2 * M_ * W * C + 2 * 2 * Q * M_ * C  # cross-attn
        fwd += 2 * T * C * C * 4 + 2 * 2 * T * (Q + T) * C + 2 * 2 * T * C * I  # text
    fwd += 2 * T * C * C + 2 * T * C * V  # LM head
    project = 2 * M_ * cfg.video.width * W  # encoder tokens -> memory; their input is frozen
    return batch * (3 * fwd + 2 * project)


def encoder_forward_flops(vcfg, batch):
    """Forward FLOPs of a ViT tower (matmuls only: patch embedding, attention, MLP)."""
    D, N = vcfg.width, vcfg.tokens_per_frame
    T = vcfg.num_frames
    per_layer = 2 * N * D * D * 4 + 2 * 2 * N * N * D + 2 * 2 * N * D * vcfg.mlp_dim
    if vcfg.temporal:
        per_layer += 2 * N * D * D * 4 + 2 * 2 * N * T * D
    patch = 2 * vcfg.num_patches * vcfg.num_channels * vcfg.patch_size ** 2 * D
    return batch * T * (vcfg.layers * per_layer + patch)


def matmul_peak(device, dtype, n=None, repeats=5):
    """FLOP/s of a large square matmul on this device: the peak the MFU is measured against."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, repeats, warmup=2, sync=syncer(device))


# -----------------------------------------------------------------------------
# Benchmarks


def paper_batch(cfg, batch, device, text_len=32):
    """Encoder outputs and captions at the paper's shapes: 8*257 video + 593 audio tokens."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(batch, cfg.video.num_frames * cfg.video.tokens_per_frame, cfg.video.width, generator=g)
    a = torch.randn(batch, cfg.audio.tokens_per_frame, cfg.audio.width, generator=g)
    ids = torch.randint(0, cfg.qformer.vocab_size, (batch, text_len), generator=g)
    ids[:, 0] = cfg.qformer.bos_token_id
    return v.to(device), a.to(device), ids.to(device)


def bench_qformer_step(net, device, dtype, batch, repeats):
    cfg = net.cfg
    v, a, ids = paper_batch(cfg, batch, device)
    params = [p for p in net.parameters() if p.requires_grad]

    def step():
        with autocast_context(device, dtype):
            _, loss = net(captions=ids, video_tokens=v, audio_tokens=a)
        loss.backward()
        for p in params:
            p.grad = None

    def with_impl(impl):
        def run():
            M.set_attention_impl(net, impl)
            step()
        return run

    net.train()
    out = compare({"plain": with_impl("plain"), "sdpa": with_impl("sdpa")}, repeats, sync=syncer(device))
    M.set_attention_impl(net, "auto")
    flops = qformer_step_flops(cfg, batch, ids.size(1), v.size(1) + a.size(1))
    return out, flops


def bench_cached_step(net, device, dtype, batch, repeats):
    """Stage-2 step from pixels (frozen encoders recomputed every step) vs from their cached
    outputs: the step a --cache-features run takes."""
    cfg = net.cfg
    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch, 3, cfg.video.num_frames, *cfg.video.image_size, generator=g).to(device)
    audio = torch.randn(batch, 3, *cfg.audio.image_size, generator=g).to(device)
    _, _, ids = paper_batch(cfg, batch, device)
    with torch.no_grad(), autocast_context(device, dtype):
        vt, at = net.encode(video, audio)
    vt, at = vt.half().to(dtype if dtype != torch.float32 else torch.float32), at.half().to(vt.dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    net.train()

    def step(**inputs):
        with autocast_context(device, dtype):
            _, loss = net(captions=ids, **inputs)
        loss.backward()
        for p in params:
            p.grad = None

    t = compare({"recompute": lambda: step(video=video, audio=audio),
                 "cached": lambda: step(video_tokens=vt, audio_tokens=at)}, repeats, sync=syncer(device))
    return t["recompute"], t["cached"]


def bench_compile(net, device, dtype, batch, repeats):
    """Q-Former training step: eager vs torch.compile (the --compile flag of the scripts);
    compilation happens in the warm-up and is timed apart."""
    cfg = net.cfg
    v, a, ids = paper_batch(cfg, batch, device)
    params = [p for p in net.parameters() if p.requires_grad]
    compiled = torch.compile(net)

    def step(m):
        with autocast_context(device, dtype):
            _, loss = m(captions=ids, video_tokens=v, audio_tokens=a)
        loss.backward()
        for p in params:
            p.grad = None

    net.train()
    t0 = time.perf_counter()
    step(compiled)
    syncer(device)()
    compile_s = time.perf_counter() - t0
    t = compare({"eager": lambda: step(net), "compiled": lambda: step(compiled)}, repeats, sync=syncer(device))
    return t["eager"], t["compiled"], compile_s


def bench_kv_cache(net, device, dtype, batch, repeats, tokens=30):
    cfg = net.cfg
    v, a, _ = paper_batch(cfg, batch, device)
    net.eval()
    with autocast_context(device, dtype):
        gen = lambda use_cache: net.generate(video_tokens=v, audio_tokens=a, max_length=tokens,
                                             min_length=tokens, use_cache=use_cache)
        same = torch.equal(gen(True), gen(False))
        t = compare({"slow": lambda: gen(False), "fast": lambda: gen(True)}, repeats, sync=syncer(device))
    return t["slow"], t["fast"], same


def bench_cache_read(cfg, batch, clips=64, workers=2):
    """Batches of `batch` clips read from a feature cache at the paper's shapes ((2056 + 593) x
    1024 fp16 = 5.4 MB a clip) through the training loader: from the page cache, and cold
    (the files' pages evicted first). Returns seconds per batch and bytes per clip."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "ann.json"), "w") as f:
            json.dump([{"id": f"clip{i:04d}", "caption": "a clip"} for i in range(clips)], f)
        ds = data.AVCaptionDataset(os.path.join(tmp, "ann.json"), tmp, data.MediaConfig.from_model(cfg))
        fc = cache.FeatureCache(os.path.join(tmp, "cache"), ds, cfg, fingerprint="bench")
        writer = cache.ShardWriter(fc.dir, fc.shapes, clips)
        g = torch.Generator().manual_seed(0)
        for k in range(clips):  # random features stand in for encoder outputs
            writer.put(k, fc.paths[k], cache.OK, cache.clip_identity(fc.media_path(k)),
                       **{m: torch.randn(fc.shapes[m], generator=g).half().numpy() for m in fc.modalities})
        writer.close()
        shard = writer.dir

        def read_all(cold):
            if cold:  # evict the cache files from the page cache (they are clean after flush)
                fc.close()  # unmapped, so that evicting the pages can take effect
                for name in fc.modalities:
                    fd = os.open(os.path.join(shard, f"{name}.npy"), os.O_RDONLY)
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
            loader = data.loader(fc, batch_size=batch, num_workers=workers)
            t = time.perf_counter()
            n = sum(1 for _ in loader)
            return (time.perf_counter() - t) / n

        out = {}
        for cold in (True, False):
            read_all(cold)  # warm-up (workers, imports)
            out["cold" if cold else "warm"] = statistics.median(read_all(cold) for _ in range(3))
        per_clip = sum(2 * math.prod(fc.shapes[name]) for name in fc.modalities)  # fp16
    return out, per_clip


def bench_train_steps(cfg, device, repeats, batches=(16, 32, 64, 128, 256), dtype=torch.bfloat16):
    """The whole stage-2 step as train_caption.py takes it from the feature cache (fp16 tokens
    in, autocast, backward, gradient clipping, AdamW: T.train_step), at each batch size until
    memory runs out, then torch.compile at the batch with the most clips/s; and the paper's
    path from pixels at that batch (frozen towers in bf16, patch dropout 0.5 on the video
    tower in training), which the cache cannot take. Returns {setting: {batch: (seconds,
    peak allocated bytes) or None (out of memory)}} and the FLOPs of a one-clip cached step."""
    torch.manual_seed(0)
    net = M.UniQ4Cap(cfg, encoders=False).to(device)
    optimizer = T.make_optimizer(net, 1e-4, 0.05, device_type=device.type)
    mem_len = cfg.video.num_frames * cfg.video.tokens_per_frame + cfg.audio.tokens_per_frame
    out = {"eager": {}, "compile": {}, "pixels": {}}

    def measure(model, batch, pixels=False):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            v, a, ids = paper_batch(cfg, batch, device)
            if pixels:
                g = torch.Generator().manual_seed(0)
                inputs = {"video": torch.randn(batch, 3, cfg.video.num_frames, *cfg.video.image_size, generator=g),
                          "audio": torch.randn(batch, 3, *cfg.audio.image_size, generator=g)}
                inputs = {k: x.to(device) for k, x in inputs.items()}
            else:
                inputs = {"video_tokens": v.half(), "audio_tokens": a.half()}  # as the cache stores them

            def loss_fn(_):
                with autocast_context(device, dtype):
                    return model(captions=ids, **inputs)[1], {}
            seconds = timeit(lambda: T.train_step(optimizer, [None], loss_fn, 1.0), repeats, warmup=2,
                             sync=syncer(device))
            return seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            return None

    net.train()
    for batch in batches:
        out["eager"][batch] = measure(net, batch)
        if out["eager"][batch] is None:
            break
    fits = {b: r for b, r in out["eager"].items() if r is not None}
    best = max(fits, key=lambda b: b / fits[b][0])
    out["compile"][best] = measure(torch.compile(net, dynamic=False), best)
    net.build_encoders()  # the paper's path: towers held in bf16, as train_caption.py does on a GPU
    net.video_encoder.to(device, dtype)
    net.audio_encoder.to(device, dtype)
    net.train()
    net.video_encoder.train()  # patch dropout in training, as cfg.frozen_patch_dropout has it
    out["pixels"][best] = measure(net, best, pixels=True)
    return out, qformer_step_flops(cfg, 1, 32, mem_len)


# Environment variables that hold each library to AVX2 code paths on a CPU with AVX-512 or AMX:
# ATen's own kernels (PyTorch's CPU capability dispatch), MKL's (the fp32 matmuls), oneDNN's
# (the convolutions). They are read once, at load time: hence a fresh process for each setting.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def tiny_step_times(repeats):
    """Seconds per step of the tiny main job on this CPU, fp32, synthetic inputs: stage 1
    (train_align's encoders and defaults: NCE + MIL-NCE through training.train_step, clipping
    and AdamW included) and the stage-2 step from cached features at the tiny recipe's batch
    (bench_cached_step: forward and backward)."""
    torch.manual_seed(0)
    cfg = M.PRESETS["tiny"]()
    args = train_align.get_args([])
    aligner = train_align.Aligner(cfg)
    optimizer = T.make_optimizer(aligner, args.lr, args.weight_decay)
    video = torch.randn(args.batch_size, 3, cfg.video.num_frames, *cfg.video.image_size)
    audio = torch.randn(args.batch_size, 3, *cfg.audio.image_size)
    loss_fn = lambda _: aligner(video, audio, args.mil_weight, args.mil_bags)
    stage1 = timeit(lambda: T.train_step(optimizer, [None], loss_fn, args.clip), repeats, warmup=3)
    batch = train_caption.RECIPE["batch_size"]["tiny"]
    _, stage2 = bench_cached_step(M.UniQ4Cap(cfg), torch.device("cpu"), torch.float32, batch, repeats)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "stage1_s": stage1, "stage2_s": stage2,
            "stage1_batch": args.batch_size, "stage2_batch": batch}


def bench_isa(repeats, rounds=3):
    """tiny_step_times in fresh processes as this CPU runs them and held to AVX2, in turns
    (native, AVX2, native, ...) so that drift in the machine's speed hits both alike; the
    median over the rounds of each."""
    runs = {"native": [], "avx2": []}
    for _ in range(rounds):
        for name, held in (("native", {}), ("avx2", AVX2_ONLY)):
            env = {k: v for k, v in os.environ.items() if k not in AVX2_ONLY} | held
            child = subprocess.run([sys.executable, os.path.abspath(__file__), "--tiny-steps", "--repeats", str(repeats)],
                                   env=env, capture_output=True, text=True)
            if child.returncode != 0:
                raise RuntimeError(f"the {name} child failed:\n{child.stderr}")
            runs[name].append(json.loads(child.stdout.strip().splitlines()[-1]))
    return {name: {**got[0], **{k: statistics.median(g[k] for g in got) for k in ("stage1_s", "stage2_s")}}
            for name, got in runs.items()}


def bench_decode(repeats):
    """Our decoder (seeks to the 8 frames it needs) vs decoding every frame, 720p H.264."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in (10, 60):
            path = os.path.join(tmp, f"clip{seconds}.mp4")
            data.write_test_clip(path, seconds=seconds, width=1280, height=720)
            t = compare({"every": lambda: (data.read_video_frames_decode_all(path, 8), data.read_audio(path)),
                         "ours": lambda: (data.read_video_frames(path, 8), data.read_audio(path))}, repeats)
            out[seconds] = (t["every"], t["ours"])
    return out


def transformers_peer(net, attn_implementation):
    """transformers' BLIP-2 Q-Former (Blip2QFormerModel, with Blip2TextEmbeddings for the
    caption and BERT's BertLMPredictionHead) holding a copy of `net`'s Q-Former weights, on
    net's device.
    Returns logits_of(memory, ids) -> (B, T, V): one joint pass over queries and caption, as
    transformers runs it, with a mask that lets the queries see only queries and each word
    every query and the words before it, the same function as our query pass + text pass."""
    from transformers import BertConfig, Blip2QFormerConfig, Blip2QFormerModel
    from transformers.models.bert.modeling_bert import BertLMPredictionHead
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
    q = net.cfg.qformer
    cfg = Blip2QFormerConfig(vocab_size=q.vocab_size, hidden_size=q.hidden, num_hidden_layers=q.layers,
                             num_attention_heads=q.heads, intermediate_size=q.intermediate,
                             hidden_dropout_prob=q.dropout, attention_probs_dropout_prob=q.dropout,
                             max_position_embeddings=q.max_positions, layer_norm_eps=q.layer_norm_eps,
                             cross_attention_frequency=q.cross_attention_freq, encoder_hidden_size=q.encoder_width,
                             use_qformer_text_input=True, pad_token_id=q.pad_token_id,
                             attn_implementation=attn_implementation)
    peer = torch.nn.ModuleDict({
        "embeddings": Blip2TextEmbeddings(cfg), "qformer": Blip2QFormerModel(cfg),
        "head": BertLMPredictionHead(BertConfig(hidden_size=q.hidden, vocab_size=q.vocab_size,
                                                layer_norm_eps=q.layer_norm_eps, hidden_act="gelu"))})
    ours = net.Qformer.state_dict()
    ours["query_tokens"] = net.query_tokens.detach()

    def our_name(k):  # their parameter name -> ours
        k = k.replace("embeddings.", "bert.embeddings.", 1).replace("qformer.layernorm.", "bert.embeddings.LayerNorm.")
        k = k.replace("qformer.encoder.", "bert.encoder.").replace("head.", "cls.predictions.", 1)
        k = k.replace("attention.attention.", "attention.self.")  # (crossattention.attention. too)
        return k.replace("cls.predictions.decoder.bias", "cls.predictions.bias")

    with torch.no_grad():
        for k, p in peer.named_parameters():
            p.copy_(ours[our_name(k)])
    peer.head.decoder.weight = peer.embeddings.word_embeddings.weight  # tied, as ours
    peer.to(next(net.parameters()).device).train(net.training)
    query_tokens = torch.nn.Parameter(net.query_tokens.detach().clone())

    def logits_of(memory, ids):
        B, Q, T = ids.size(0), q.num_query_tokens, ids.size(1)
        mask = torch.zeros(Q + T, Q + T, dtype=torch.bool, device=ids.device)  # True: may attend
        mask[:Q, :Q] = True
        mask[Q:, :Q] = True
        mask[Q:, Q:] = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        bias = torch.zeros(mask.shape, device=ids.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        x = peer.embeddings(input_ids=ids, query_embeds=query_tokens.expand(B, -1, -1))
        h = peer.qformer(query_embeds=x, query_length=Q, attention_mask=bias[None, None],
                         encoder_hidden_states=memory).last_hidden_state
        return peer.head(h[:, Q:])

    logits_of.modules = (peer, query_tokens)
    return logits_of


def bench_peer(net, device, dtype, batch, repeats):
    """Our Q-Former step (query pass, then the caption reading the queries' cached keys and
    values) vs transformers' on the same weights and the same memory (the projected encoder
    tokens at the paper's shapes, with a gradient, as training gives it), forward and backward
    with the caption loss. The outputs are checked to agree first (fp32, no dropout). Returns
    (max |logit difference|, {name: seconds})."""
    cfg = net.cfg
    v, a, ids = paper_batch(cfg, batch, device)
    with torch.no_grad():
        memory = net.memory(v, a)[0].float()
    peers = {impl: transformers_peer(net, impl) for impl in ("sdpa", "eager")}

    def ours(memory, ids):
        logits, _ = net.Qformer.decode_text(ids, net.Qformer.read_memory(net.query_tokens, memory))
        return logits

    was = net.training
    net.eval()
    for p in peers.values():
        p.modules[0].eval()
    with torch.no_grad():
        want = ours(memory, ids)
        diff = max((p(memory, ids) - want).abs().max().item() for p in peers.values())
    if diff > 1e-3 * want.abs().max().item():
        raise RuntimeError(f"transformers' Q-Former disagrees with ours on the same weights: max |difference| {diff:.3g}")
    net.train()
    for p in peers.values():
        p.modules[0].train()
    memory.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad] + [memory]
    params += [p for peer in peers.values() for p in peer.modules[0].parameters()] + [peer.modules[1] for peer in peers.values()]

    def step(logits_of):
        with autocast_context(device, dtype):
            logits = logits_of(memory, ids)
            loss = caption_loss(logits[:, :-1], ids[:, 1:], cfg.label_smoothing)
        loss.backward()
        for p in params:
            p.grad = None

    t = compare({"ours": lambda: step(ours), **{impl: (lambda p=p: step(p)) for impl, p in peers.items()}},
                repeats, sync=syncer(device))
    net.train(was)
    return diff, t


def _cached_step_peak(towers, device_name, dtype_name, batch):
    """In a fresh process: the full preset built as train_caption.py builds it when its feature
    cache is complete, with the frozen towers built and kept (the code before
    UniQ4Cap(encoders=False)) or never built, then two cached-feature training steps with
    AdamW. The peak memory of the whole process, building included: the resident set's
    high-water mark on a CPU, allocated memory on CUDA. Bytes."""
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    torch.manual_seed(0)
    cfg = M.full_config()
    cfg.frozen_patch_dropout = False
    net = M.UniQ4Cap(cfg, encoders=towers).to(device)
    if towers and dtype == torch.bfloat16:  # train_caption.py holds frozen towers in bf16
        net.video_encoder.to(dtype)
        net.audio_encoder.to(dtype)
    optimizer = T.make_optimizer(net, 1e-4, 0.05, device_type=device.type)
    v, a, ids = paper_batch(cfg, batch, device)
    net.train()
    for _ in range(2):
        with autocast_context(device, dtype):
            _, loss = net(captions=ids, video_tokens=v, audio_tokens=a)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def bench_memory(device, dtype, batch):
    """_cached_step_peak with the towers built vs never built, each in a process of its own."""
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return {towers: pool.apply(_cached_step_peak, (towers, str(device), str(dtype).replace("torch.", ""), batch))
                for towers in (True, False)}


def bench_rank_gallery(net, device, repeats, clips=16, texts=16, k=2, text_len=12):
    """Rank `clips` stored clips for each of `texts` texts (random memories, token ids and
    features: the cost does not depend on the values). Baseline: the matching head on every
    pair, in batches of `clips`. Candidate: retrieve.rerank's route, the ITC matrix over the
    stored features (computed beforehand, as a gallery keeps them) then ITM on each text's top k
    and each clip's top k. Returns (seconds, seconds)."""
    q = net.cfg.qformer
    g = torch.Generator().manual_seed(0)
    mem_len = net.cfg.video.num_frames * net.cfg.video.tokens_per_frame + net.cfg.audio.tokens_per_frame
    memory = torch.randn(clips, mem_len, q.encoder_width, generator=g).to(device)
    full_mask = torch.ones(clips, mem_len, dtype=torch.bool, device=device)
    ids = torch.randint(q.bos_token_id + 1 if q.bos_token_id + 1 < q.vocab_size else 1, q.vocab_size,
                        (texts, text_len), generator=g).to(device)
    text_mask = torch.ones_like(ids, dtype=torch.bool)
    clip_feats = F.normalize(torch.randn(clips, q.num_query_tokens, q.proj_dim, generator=g), dim=-1)
    text_feats = F.normalize(torch.randn(texts, q.proj_dim, generator=g), dim=-1)

    class Tok:  # stands in for the tokenizer retrieve.rerank takes: text "t" is row t of the random ids
        cls_id = q.bos_token_id

        @staticmethod
        def encode(batch, max_len):
            rows = torch.tensor([int(t) for t in batch])
            return ids[rows].cpu().clone(), text_mask[rows].cpu()

    def every_pair():
        with torch.no_grad():
            for t in range(texts):
                net.match_logits(memory, full_mask, ids[t].expand(clips, -1), text_mask[t].expand(clips, -1))

    def top_k():
        sim = retrieve.itc_similarity(text_feats, clip_feats)
        retrieve.rerank(net, sim, [str(t) for t in range(texts)], lambda rows: (memory[rows], full_mask[rows]),
                        Tok, device, contextlib.nullcontext(), k, batch_size=clips)

    t = compare({"all": every_pair, "top": top_k}, repeats, sync=syncer(device))
    return t["all"], t["top"]


def bench_sample(device, repeats, clips=256, batch=16, workers=2, tokens=14):
    """sample.py on a folder of `clips` embedded-dataset clips at the tiny preset: the batched
    path (decoding in `workers` loader processes while the model captions `batch` clips per
    generate call) vs the one-at-a-time loop it replaced (decode a file, caption it, the next),
    and what bounds the batched path: its loader alone, and the model alone on batches decoded
    beforehand. Every caption is `tokens` long ([DEC] included, about the embedded captions'
    length), so the untrained model here does the work a trained one does. Returns seconds
    per clip for each."""
    with tempfile.TemporaryDirectory() as tmp:
        data.make_embedded_dataset(tmp, splits={"bench": clips}, progress=False)
        with open(os.path.join(tmp, "bench.json")) as f:
            records = json.load(f)
        files = [os.path.join(tmp, f"{r['id']}.mp4") for r in records]
        tokenizer = data.Tokenizer.train([r["caption"] for r in records], 200)
        net = M.UniQ4Cap(tokenizer.configure(M.tiny_config())).eval().to(device)
        args = sample.get_args(["--video", tmp, "--min-length", str(tokens), "--max-length", str(tokens),
                                "--batch-size", str(batch), "--num-workers", str(workers)])
        args.device = device
        media = data.MediaConfig.from_model(net.cfg)
        decoding = T.decoding_kwargs(args)

        @torch.no_grad()
        def one_at_a_time():
            for path in files:
                clip = data.decode_clip(path, media)
                audio = None if clip["audio_missing"] else clip["audio"][None].to(device)
                ids = net.generate(video=clip["video"][None].to(device), audio=audio, **decoding)
                tokenizer.decode(ids[0].cpu())

        def batched():
            for _ in sample.caption_batches(net, tokenizer, files, args):
                pass

        def loader():
            return data.loader(data.VideoFiles(files, media), batch_size=batch, num_workers=workers)

        decoded = list(loader())

        @torch.no_grad()
        def model_only():
            for b in decoded:
                net.generate(**T.model_inputs(b, device), **decoding)

        t = compare({"one": one_at_a_time, "batched": batched, "decode": lambda: list(loader()),
                     "model": model_only}, repeats, sync=syncer(device))
    return {k: v / clips for k, v in t.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    p.add_argument("--batch", type=int, default=0, help="batch for the step rows (default: 2 on CPU, 16 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--only", default="", help="comma-separated rows: qformer-step,peer,train-step,compile,cached-step,cache-read,kv-cache,decode,memory,sample,rank-gallery,isa "
                                             "(compile runs by default on CUDA only, isa only when named)")
    p.add_argument("--out", default="out/bench.json", help="where the JSON goes")
    p.add_argument("--preset", default="full", choices=sorted(M.PRESETS),
                   help="model size (full: the paper's; tiny only checks that the rows run)")
    p.add_argument("--tiny-steps", action="store_true", help=argparse.SUPPRESS)  # the isa row's child
    args = p.parse_args()
    if args.tiny_steps:
        print(json.dumps(tiny_step_times(args.repeats)))
        return
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    batch = args.batch or (16 if device.type == "cuda" else 2)
    only = set(filter(None, args.only.split(",")))
    want = lambda row: not only or row in only
    rows, results = [], {"device": str(device), "torch": torch.__version__, "batch": batch,
                         "threads": torch.get_num_threads()}

    def row(name, baseline, base_s, candidate, cand_s, note=""):
        ratio = base_s / cand_s
        rows.append((name, f"{baseline} {base_s * 1e3:.0f} ms", f"{candidate} {cand_s * 1e3:.0f} ms", f"{ratio:.2f}x", note))
        results[name] = {"baseline": baseline, "baseline_s": base_s, "candidate": candidate,
                         "candidate_s": cand_s, "speedup": ratio, "note": note}

    torch.manual_seed(0)
    cfg = M.PRESETS[args.preset]()
    # every row reads the whole memory, as a --cache-features run does: the paper's frozen
    # patch dropout (half the video patches in training) would make the rows compare unlike steps
    cfg.frozen_patch_dropout = False
    # the rows that time the model at --preset (isa builds its own tiny ones in child processes)
    uses_net = ["qformer-step", "peer", "compile", "cached-step", "kv-cache", "rank-gallery"]
    net = M.UniQ4Cap(cfg).to(device) if any(want(r) for r in uses_net) else None
    dtypes = [torch.float32, torch.bfloat16]
    if want("qformer-step"):
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            times, flops = bench_qformer_step(net, device, dtype, batch, args.repeats)
            row(f"qformer-step {name}", "plain", times["plain"], "sdpa", times["sdpa"])
            peak = matmul_peak(device, dtype)
            best = min(times.values())
            achieved = flops / best
            results[f"mfu {name}"] = {"flops_per_step": flops, "achieved_flops": achieved,
                                      "peak_flops": peak, "mfu": achieved / peak,
                                      "faster_path": min(times, key=times.get)}
            rows.append((f"mfu {name}", f"matmul peak {peak / 1e9:.0f} GFLOP/s",
                         f"step {achieved / 1e9:.0f} GFLOP/s", f"{achieved / peak:.0%}",
                         f"faster path: {min(times, key=times.get)}; the model's auto picks "
                         + M.faster_attention(device, dtype)))
    if want("peer"):
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            diff, t = bench_peer(net, device, dtype, batch, args.repeats)
            for impl in ("sdpa", "eager"):
                row(f"peer {name} {impl}", f"transformers {impl}", t[impl], "ours", t["ours"],
                    f"Q-Former + LM head fwd+bwd from the memory, batch {batch}; outputs agree (fp32: max "
                    f"|logit difference| {diff:.1e})")
    if want("train-step") and (device.type == "cuda" or "train-step" in only):
        dtype = torch.bfloat16
        steps, flops_per_clip = bench_train_steps(cfg, device, args.repeats)
        peak = matmul_peak(device, dtype)
        base_batch = min(steps["eager"])
        base = base_batch / steps["eager"][base_batch][0]  # clips/s of the smallest batch, eager
        best_rate = 0.0
        for setting, by_batch in steps.items():
            for b, got in by_batch.items():
                name = f"train-step {setting} batch {b}"
                if got is None:
                    rows.append((name, "-", "out of memory", "-", ""))
                    results[name] = {"oom": True}
                    continue
                seconds, mem = got
                rate = b / seconds
                what = "from pixels, towers in bf16, video patch dropout 0.5" if setting == "pixels" else "from the cache"
                mfu = "" if setting == "pixels" else f"MFU {b * flops_per_clip / seconds / peak:.0%} of {peak / 1e12:.3g} TFLOP/s, "
                mem_note = "" if mem is None else f"peak allocated {mem / 2**30:.1f} GiB, "
                rows.append((name, f"eager batch {base_batch} {base:.1f} clips/s", f"{rate:.1f} clips/s",
                             f"{rate / base:.2f}x", f"{mfu}{mem_note}{what}, bf16"))
                results[name] = {"clips_per_s": rate, "step_s": seconds, "baseline_clips_per_s": base,
                                 "mfu": None if setting == "pixels" else b * flops_per_clip / seconds / peak,
                                 "peak_allocated_bytes": mem, "matmul_peak_flops": peak}
                if setting != "pixels":
                    best_rate = max(best_rate, rate)
        # the loader must keep up with the best cached step, --num-workers being the only knob
        best_batch = next(iter(steps["compile"]))
        for workers in (2, 4, 8, 16):
            if workers > (os.cpu_count() or 1):
                break
            reads, _ = bench_cache_read(cfg, best_batch, clips=2 * best_batch, workers=workers)
            rate = best_batch / reads["warm"]
            rows.append((f"cache-read batch {best_batch} workers {workers}", f"best step {best_rate:.1f} clips/s",
                         f"loader {rate:.1f} clips/s (cold {best_batch / reads['cold']:.1f})",
                         f"{rate / best_rate:.2f}x", ">= 1x: the loader keeps up"))
            results[f"cache-read batch {best_batch} workers {workers}"] = {
                "loader_clips_per_s": rate, "cold_clips_per_s": best_batch / reads["cold"], "step_clips_per_s": best_rate}
    if want("compile") and (device.type == "cuda" or "compile" in only):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        eager, compiled, compile_s = bench_compile(net, device, dtype, batch, args.repeats)
        row("compile qformer-step", "eager", eager, "torch.compile", compiled,
            f"{str(dtype).replace('torch.', '')}, compiling took {compile_s:.0f} s")
    if want("cached-step"):
        cb = 1 if device.type == "cpu" else batch
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        if dtype == torch.bfloat16:  # frozen encoders held in bf16, as the training scripts do on GPU
            net.video_encoder.to(dtype)
            net.audio_encoder.to(dtype)
        recompute, cached = bench_cached_step(net, device, dtype, cb, args.repeats)
        net.video_encoder.float()
        net.audio_encoder.float()
        row("cached-step", "recompute encoders", recompute, "cached features", cached,
            f"batch {cb}, {str(dtype).replace('torch.', '')}")
        flops_ratio = (encoder_forward_flops(cfg.video, 1) + encoder_forward_flops(cfg.audio, 1)
                       + qformer_step_flops(cfg, 1, 32, 2649)) / qformer_step_flops(cfg, 1, 32, 2649)
        results["cached-step"]["flop_ratio"] = flops_ratio
    if want("cache-read"):
        # the loader must deliver clips faster than the cached-feature step consumes them;
        # read in batches of 16 (the GPU batch) whatever the step's batch, then compare per clip
        rb = 16
        reads, per_clip = bench_cache_read(cfg, rb)
        for kind, read_s in reads.items():
            note = f"{rb * per_clip / read_s / 1e9:.2f} GB/s ({per_clip / 1e6:.1f} MB a clip, batches of {rb})"
            if "cached-step" in results:
                step_batch = 1 if device.type == "cpu" else batch
                step_s = results["cached-step"]["candidate_s"] / step_batch
                row(f"cache-read {kind}", "cached step / clip", step_s, "loader / clip", read_s / rb,
                    note + f"; the step needs {per_clip / step_s / 1e6:.0f} MB/s")
            else:
                results[f"cache-read {kind}"] = {"clip_s": read_s / rb, "bytes_per_s": rb * per_clip / read_s}
                rows.append((f"cache-read {kind}", "-", f"loader {read_s / rb * 1e3:.1f} ms / clip", "-", note))
    if want("kv-cache"):
        slow, fast, same = bench_kv_cache(net, device, torch.float32, batch, args.repeats)
        row("kv-cache greedy 30 tokens", "no cache", slow, "KV cache", fast,
            "identical tokens" if same else "TOKENS DIFFER")
    if want("decode"):
        for seconds, (every, ours) in bench_decode(args.repeats).items():
            row(f"decode {seconds}s 720p", "every frame", every, "ours", ours, "8 frames + audio")
    if want("memory"):
        mb = 1 if device.type == "cpu" else batch
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        peak = bench_memory(device, dtype, mb)
        kind = "peak allocated" if device.type == "cuda" else "peak RSS"
        rows.append(("memory cached-step", f"towers built {peak[True] / 2**30:.2f} GiB",
                     f"never built {peak[False] / 2**30:.2f} GiB", f"{peak[False] / peak[True]:.2f}x",
                     f"{kind} of a process that builds the full preset and runs two steps with AdamW "
                     f"from cached features, batch {mb}, {str(dtype).replace('torch.', '')}"))
        results["memory cached-step"] = {"kind": kind, "towers_built_bytes": peak[True],
                                         "towers_never_built_bytes": peak[False], "batch": mb}
    if "isa" in only:  # only when named
        got = bench_isa(max(args.repeats, 10))
        native, held = got["native"], got["avx2"]
        for stage, what in (("stage1", "stage-1 step with clipping and AdamW"),
                            ("stage2", "stage-2 forward and backward from the cache")):
            row(f"isa tiny {stage}", "AVX2 code paths", held[f"{stage}_s"], f"this CPU's ({native['capability']})",
                native[f"{stage}_s"], f"{what}, batch {native[stage + '_batch']}, fp32; each in fresh processes, "
                f"in turns (held: {held['capability']})")
        results["isa"] = got
    if want("rank-gallery"):
        net.eval()
        every, top = bench_rank_gallery(net, device, args.repeats)
        row("rank-gallery 16 texts x 16 clips", "ITM every pair", every, "ITC + ITM top 2", top,
            "fp32; the clip features stored, as a gallery keeps them")
    if want("sample"):
        t = bench_sample(device, args.repeats)
        bound = "decoding" if t["decode"] > t["model"] else "the model"
        row("sample.py 256 clips", "one at a time", t["one"], "batched", t["batched"],
            f"tiny, batches of 16, 2 decoding workers; per clip: loader alone {t['decode'] * 1e3:.1f} ms, "
            f"model alone {t['model'] * 1e3:.1f} ms: bound by {bound}")
        results["sample.py 256 clips"].update(decode_s=t["decode"], model_s=t["model"], bound=bound)

    widths = [max(len(str(r[i])) for r in rows + [("row", "baseline", "candidate", "ratio", "")]) for i in range(5)]
    print(f"device {device}, batch {batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for r in [("row", "baseline", "candidate", "ratio", "")] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
