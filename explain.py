"""Where a caption's words come from: each word's attribution over the memory the Q-Former
reads (the frames' patches and the spectrogram's patches), the picture of it that
`sample.py --explain DIR` draws for every clip it captions, and, run as a script, the
per-word video/audio shares measured over a split of the embedded dataset:

    python sample.py --video clip.mp4 --explain pictures/      # pictures/clip.mp4.png
    python explain.py --ckpt out/caption/best.pth               # shares per attribute word, test split
    python explain.py --ckpt out/caption/best.pth --untrained   # the same for an untrained Q-Former

The method is attention x gradient on the Q-Former's cross-attention: Grad-CAM on attention
maps, as LAVIS's `compute_gradcam` (`lavis/models/blip_models/blip_image_text_matching.py`)
does for BLIP's image-text matching score, here for the caption's log-probabilities. The
caption is given (teacher forcing); for each word w,
    s(w)   = log p(w's tokens | the clip, the words before w)
    R_w[m] = sum over the cross-attention layers l, heads h and queries q of
             A_l[h, q, m] * max(0, d s(w) / d A_l[h, q, m])
where A_l[h, q, m] is how much query q reads memory token m. The text never reads the
memory itself: each layer's text tokens read the queries' keys and values (QFormer.decode_text),
so the gradient runs from the word's log-probability back through the queries to their
cross-attention maps. A word's video share is R_w summed over the video tokens over R_w summed
over all of them. The class tokens (one per frame, one for the spectrogram) count in the shares
but are not drawn.

What it is: first-order evidence of which tokens the queries read *and* whose greater weight
would make the word likelier. What it is not: a causal measure (removing the tokens with the
most attribution need not change the caption most), nor a map of where in the pixels the
information started: every memory token is a tower's output, which has already mixed its
frame's patches (and, in the video tower, the frames, through temporal attention), so a hot
patch says where the Q-Former read, not what the tower read to fill it. Positive gradients only,
as Grad-CAM: what speaks against a word is not shown.

matplotlib is imported only where a picture is drawn.
"""

import argparse
import json
import os
import sys

import torch

import data
import model as M
import training as T

# -----------------------------------------------------------------------------
# Attribution


def cross_attentions(net):
    """The Q-Former's cross-attention modules, the queries' reads of the memory."""
    return [layer.crossattention for layer in net.Qformer.bert.encoder.layer if layer.has_cross]


def caption_tokens(tokenizer, ids):
    """A caption's token ids (without [DEC]) up to its [SEP], padding dropped."""
    ids = [int(i) for i in ids]
    if tokenizer.sep_id in ids:
        ids = ids[:ids.index(tokenizer.sep_id)]
    return [i for i in ids if i not in (tokenizer.pad_id, tokenizer.bos_id)]


def words_of(tokenizer, ids):
    """[(word, [positions of its tokens in ids])]: WordPiece's `##` pieces join the word before."""
    words = []
    for n, i in enumerate(ids):
        piece = tokenizer.tok.id_to_token(i)
        if piece.startswith("##") and words:
            words[-1] = (words[-1][0] + piece[2:], words[-1][1] + [n])
        else:
            words.append((piece, [n]))
    return words


def attribute(net, memory, memory_mask, ids, tokenizer):
    """One clip: memory (1, M, W) and memory_mask (1, M) or None, as UniQ4Cap.memory gives
    them; ids, a caption's token ids without [DEC]. Returns [(word, R_w (M,) float32)], the
    module docstring's attribution of every word of the caption over the memory tokens."""
    ids = caption_tokens(tokenizer, ids)
    words = words_of(tokenizer, ids)
    if not words:
        return []
    seq = torch.tensor([[tokenizer.bos_id] + ids], device=memory.device)  # (1, 1+L): [DEC] w1 ... wL
    layers = cross_attentions(net)
    for a in layers:
        a.keep_map = True
    try:
        with torch.enable_grad():
            cache = net.Qformer.read_memory(net.query_tokens, memory.detach(), memory_mask)
            logits, _ = net.Qformer.decode_text(seq, cache)  # (1, 1+L, V): position t predicts token t+1
            logp = logits[0, :-1].float().log_softmax(-1).gather(1, seq[0, 1:, None])[:, 0]  # (L,)
            maps = [a.map for a in layers]  # each (1, H, Q, M)
            out = []
            for word, positions in words:
                grads = torch.autograd.grad(logp[positions].sum(), maps, retain_graph=True)
                r = sum((A * g.clamp(min=0)).float().sum(dim=(1, 2)) for A, g in zip(maps, grads))  # (1, M)
                out.append((word, r[0].detach()))
    finally:
        for a in layers:
            a.keep_map, a.map = False, None
    return out


def video_share(r, num_video):
    """The share of R_w on the first num_video memory tokens (the video's); nan where R_w is
    zero everywhere (no positive gradient reached the memory)."""
    total = float(r.sum())
    return float(r[:num_video].sum()) / total if total > 0 else float("nan")


def explain_clip(net, tokenizer, ids, video_tokens=None, audio_tokens=None, video_mask=None, audio_mask=None):
    """One clip's caption `ids` attributed: tokens as UniQ4Cap.encode returns them for this
    clip alone ((1, N, D) each, or None), masks (1,) or None. -> [(word, R_w, video share)]
    and the number of video tokens (the memory's first tokens)."""
    memory, memory_mask = net.memory(video_tokens, audio_tokens, video_mask, audio_mask)
    num_video = 0 if video_tokens is None else video_tokens.size(1)
    explained = [(w, r, video_share(r, num_video)) for w, r in attribute(net, memory, memory_mask, ids, tokenizer)]
    return explained, num_video


# -----------------------------------------------------------------------------
# The picture


def frames_for_display(video):
    """A model's video input (3, T, H, W), CLIP-normalised -> (T, H, W, 3) in [0, 1]."""
    mean = torch.tensor(data.CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(data.CLIP_STD).view(3, 1, 1, 1)
    return (video.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 3, 0).numpy()


def draw(path, cfg: M.UniQ4CapConfig, explained, num_video, video=None, audio=None, title=""):
    """Write the picture of one clip to `path` (PNG): a first row with the model's 8 input
    frames and the first of its three spectrogram chunks (mel bins up, time right), then one row
    per word of the caption: the word with its video and audio shares, the frames with the
    word's attribution over their patches, the spectrogram with it over (mel band, time).
    Every row shares one colour scale across both modalities, the word's largest patch
    attribution, so a faint modality is faint. video (3, T, H, W), audio (3, mel, L): the
    clip's model inputs (None where absent)."""
    from plot import pyplot
    plt = pyplot()

    v, a = cfg.video, cfg.audio
    T, (gh, gw), (gm, gt) = v.num_frames, v.grid, a.grid
    frames = None if video is None else frames_for_display(video)
    spec = None if audio is None else audio[0].float().cpu().numpy()  # (mel, L), chunk 1
    rows = 1 + len(explained)
    height = 1.15 * rows + 0.8  # inches: a row per word, and room for the title and the time axis
    fig, axes = plt.subplots(rows, T + 1, figsize=(T * 1.1 + 5.5, height), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * T + [4.5], "wspace": 0.06, "hspace": 0.12})
    fig.subplots_adjust(top=1 - 0.55 / height, bottom=0.45 / height)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    heat_style = dict(cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
    for row in range(rows):
        heat_v = heat_a = None
        if row == 0:
            axes[0, 0].set_ylabel("input", rotation=0, ha="right", va="center", fontsize=11)
        else:
            word, r, share = explained[row - 1]
            r = r.cpu()
            patches_v = r[:num_video].view(T, 1 + gh * gw)[:, 1:].reshape(T, gh, gw) if num_video else None
            patches_a = r[num_video:][1:].view(gm, gt) if r.numel() > num_video else None
            top = max(float(p.max()) for p in (patches_v, patches_a) if p is not None)
            top = top if top > 0 else 1.0
            heat_v = None if patches_v is None else (patches_v / top).numpy()
            heat_a = None if patches_a is None else (patches_a / top).numpy()
            label = f"{word}\n" + ("no attribution" if share != share else f"video {share:.0%}\naudio {1 - share:.0%}")
            axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
        for t in range(T):
            ax = axes[row, t]
            if frames is not None:
                H, W = frames.shape[1:3]
                ax.imshow(frames[t] * (0.35 if heat_v is not None else 1.0), extent=(0, W, H, 0))
                if heat_v is not None:
                    ax.imshow(heat_v[t], extent=(0, W, H, 0), alpha=0.75 * heat_v[t], **heat_style)
            if row == 0:
                ax.set_title(f"frame {t + 1}", fontsize=8)
        ax = axes[row, T]
        if spec is None:  # one note in the first row, nothing below it
            ax.text(0.5, 0.5, "no soundtrack: captioned from the frames alone", ha="center", va="center",
                    fontsize=9, transform=ax.transAxes)
            ax.set_visible(row == 0)
            continue
        mel, L = spec.shape
        ax.imshow(spec * (0.35 if heat_a is not None else 1.0), cmap="gray", origin="lower", aspect="auto",
                  extent=(0, L, 0, mel))
        if heat_a is not None:
            ax.imshow(heat_a, origin="lower", aspect="auto", extent=(0, L, 0, mel), alpha=0.75 * heat_a, **heat_style)
        if row == 0:
            ax.set_title("log-mel spectrogram, chunk 1 of 3 (mel bins up)", fontsize=8)
        if row == rows - 1:  # fbank frames are 10 ms apart
            seconds = range(0, int(L / 100) + 1)
            ax.set_xticks([100 * s for s in seconds], [f"{s} s" for s in seconds], fontsize=8)
    fig.suptitle(title, fontsize=12, x=0.02, y=1 - 0.15 / height, ha="left")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def picture_names(files, folder):
    """A PNG path in `folder` for each file: its name plus .png, with -2, -3, ... where two
    files of different folders share a name (the same on every rank: the list is sorted)."""
    names, seen = {}, {}
    for f in files:
        base = os.path.basename(f)
        seen[base] = seen.get(base, 0) + 1
        names[f] = os.path.join(folder, base + (f"-{seen[base]}" if seen[base] > 1 else "") + ".png")
    return names


def check_folder(folder):
    """Create `folder` if needed and prove it writable: an OSError otherwise (the caller
    turns it into one line)."""
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    with open(probe, "w"):
        pass
    os.remove(probe)


# -----------------------------------------------------------------------------
# Evidence over a split: the video share of the words that name each attribute


def attribute_words(record):
    """Positions, among the words of an embedded clip's caption ("a red circle moves up with
    rain in the background"), of the word where the caption commits to each attribute: the
    colour, the shape, the motion, and the first word of the background phrase (rain / a
    (hum) / birds / no (silence): the words after it follow from it)."""
    words = record["caption"].split()
    a = record["attributes"]
    return {"colour": words.index(a["colour"]), "shape": words.index(a["shape"]),
            "motion": words.index("moves") + 1, "background": words.index("with") + 1}


def untrained_like(net, seed):
    """The same towers and vocabulary with the Q-Former as train_caption.py starts it at the
    tiny preset (its own initialisation, no step taken): the floor of the method."""
    torch.manual_seed(seed)
    fresh = M.UniQ4Cap(net.cfg, encoders=False)
    fresh.video_encoder, fresh.audio_encoder = net.video_encoder, net.audio_encoder
    return fresh.eval().to(next(net.parameters()).device)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_checkpoint_args(p)
    T.add_data_args(p)
    p.add_argument("--split", default="test", choices=["val", "test"], help="embedded split to measure")
    p.add_argument("--max-clips", type=int, default=0, help="the first N clips of the split (0: all)")
    p.add_argument("--untrained", action="store_true",
                   help="the checkpoint's towers and vocabulary with an untrained Q-Former (the floor)")
    p.add_argument("--seed", type=int, default=42, help="the untrained Q-Former's initialisation")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    """Per attribute of the embedded dataset, the mean video share (and its spread over the
    clips) of the caption word that names it, teacher-forced on each clip's reference caption."""
    args = get_args(argv)
    args.device = T.setup_device(args.device, 0)
    try:
        net, tokenizer = T.load_captioner(args)
        data_dir, anns = T.resolve_data_paths(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.untrained:
        net = untrained_like(net, args.seed)
    dataset = data.AVCaptionDataset(anns[args.split], data_dir, data.MediaConfig.from_model(net.cfg), by_clip=True)
    if "attributes" not in dataset.records[0]:
        print("error: these annotations carry no attribute labels (the embedded dataset's do)", file=sys.stderr)
        return 2
    n = len(dataset) if not args.max_clips else min(args.max_clips, len(dataset))
    loader = data.loader(torch.utils.data.Subset(dataset, range(n)), batch_size=16, num_workers=2)
    shares = {name: [] for name in data.ATTRIBUTES}
    with torch.no_grad():
        for batch in T.progress(loader, desc=f"attributing the {args.split} captions"):
            inputs = T.model_inputs(batch, args.device)
            video_tokens, audio_tokens = net.encode(inputs["video"], inputs["audio"])
            for b, record in enumerate(batch["records"]):
                ids = tokenizer.encode([record["caption"]])[0][0][1:]  # without [DEC]
                one = lambda x: None if x is None else x[b:b + 1]  # noqa: E731 (this clip alone)
                explained, _ = explain_clip(net, tokenizer, ids, one(video_tokens), one(audio_tokens),
                                            one(inputs["video_mask"]), one(inputs["audio_mask"]))
                if [w for w, _, _ in explained] != record["caption"].split():
                    raise ValueError(f"{record['id']}: the caption's words do not map one to one on its tokens")
                for name, k in attribute_words(record).items():
                    shares[name].append(explained[k][2])
    result = {}
    print(f"{'attribute word':<16} video share (mean, std over {n} clips)")
    for name, values in shares.items():
        t = torch.tensor(values)
        result[name] = {"video_share_mean": float(t.nanmean()), "video_share_std": float(t[~t.isnan()].std()),
                        "clips": int((~t.isnan()).sum())}
        print(f"{name:<16} {result[name]['video_share_mean']:.3f} ({result[name]['video_share_std']:.3f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ckpt": args.ckpt, "split": args.split, "untrained": args.untrained, "shares": result}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
