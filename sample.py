"""Caption video files with a trained model.

    python sample.py --video clip.mp4                       # prints the caption
    python sample.py --video a.mp4 b.mp4 --decode beam      # several files: JSON Lines
    python sample.py --video folder/ --num-captions 3 --decode sample
    python sample.py --video x.mp4 --ckpt checkpoint_N.pth --preset full \\
        --bert google-bert/bert-base-cased --video-encoder LanguageBind/LanguageBind_Video_FT \\
        --audio-encoder LanguageBind/LanguageBind_Audio_FT    # the authors' stage-2 file
    python sample.py --video x.mp4 --decode sample --top-p 0.9 --top-k 50 \\
        --min-length 10 --max-length 30                     # the original's evaluation decoding

--ckpt defaults to train_caption.py's output (out/caption/best.pth), which carries its config,
tokenizer and encoder files. The authors' stage-2 checkpoint works too, given their encoders
and bert-base-cased's vocabulary. A folder is captioned file by file: every file PyAV can
open with a video stream, whatever its extension, except still pictures (a `<stem>.wav`
beside a video is that video's soundtrack, not a file to caption); the others are listed on
stderr as not readable as videos. A video without a soundtrack is captioned from its frames
alone (the audio tokens are masked out), and stderr says so (stdout holds only captions). A
named file that cannot be read gives a one-line error naming it and a non-zero exit code.
Lengths count tokens as HF's generate does, [DEC] included.
"""

import argparse
import json
import os
import sys

import torch

import data
import model as M
import training as T


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", nargs="+", required=True, help="video files or folders")
    p.add_argument("--ckpt", default="out/caption/best.pth", help="stage-2 checkpoint")
    p.add_argument("--preset", default=None, choices=sorted(M.PRESETS),
                   help="model size, for checkpoints that carry no config (the authors')")
    p.add_argument("--video-encoder", default=None, help="video encoder file (overrides the checkpoint's)")
    p.add_argument("--audio-encoder", default=None, help="audio encoder file (overrides the checkpoint's)")
    p.add_argument("--bert", default=None, help="bert-base-cased's vocabulary, for the authors' checkpoints: a folder with vocab.txt "
                        "or a repo id (google-bert/bert-base-cased, or the legacy bert-base-cased)")
    T.add_decoding_args(p)
    p.add_argument("--num-captions", type=int, default=1,
                   help="captions per video (with --decode beam at most --num-beams; greedy gives one)")
    p.add_argument("--seed", type=int, default=0, help="seed for --decode sample")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    args = p.parse_args(argv)
    T.check_decoding_args(p, args)
    return args


def encoder_path(name, ckpt):
    """An encoder file as a checkpoint names it: a bare file name is one that lay beside the
    checkpoint when it was written (train_caption.model_state), so it is looked up beside the
    checkpoint wherever that is now; anything else (a path, a public name) is used as it is."""
    beside = os.path.join(os.path.dirname(os.path.abspath(ckpt)), name)
    return beside if os.path.basename(name) == name and os.path.isfile(beside) else name


def load_captioner(args):
    """Rebuild the model a checkpoint describes. Ours (train_caption.py's best.pth) carry
    config, tokenizer and encoder names; the authors' checkpoint_N.pth has a "config" too,
    but that is their run configuration, so the tokenizer, which only ours hold, tells the
    two apart. The authors' need --preset, --bert and the encoder flags."""
    ckpt = M.read_state_dict(args.ckpt)
    if "model" not in ckpt:
        raise M.CheckpointError(f"{args.ckpt}: no 'model' entry: not a stage-2 checkpoint")
    if "tokenizer" in ckpt:
        cfg = M.config_from_dict(ckpt["config"])
        tokenizer = M.Tokenizer.from_string(ckpt["tokenizer"])
        encoders = {k: encoder_path(v, args.ckpt) for k, v in (ckpt.get("encoders") or {}).items()}
    else:
        if not (args.preset and args.bert):
            raise M.CheckpointError(f"{args.ckpt} carries no tokenizer, as the authors' checkpoint_N.pth: give "
                                    f"--preset and --bert (and their encoders: --video-encoder, --audio-encoder)")
        tokenizer = M.Tokenizer.from_bert(args.bert)
        cfg = tokenizer.configure(M.PRESETS[args.preset]())
        encoders = {}
    encoders["video"] = args.video_encoder or encoders.get("video")
    encoders["audio"] = args.audio_encoder or encoders.get("audio")
    missing = [k for k, v in encoders.items() if not v]
    if missing:
        raise M.CheckpointError(f"no weights for the {' and '.join(missing)} encoder{'s' * (len(missing) > 1)}: "
                                f"give {' and '.join(f'--{k}-encoder' for k in missing)}")
    net = M.UniQ4Cap(cfg)
    M.load_pretrained(net, video=encoders["video"], audio=encoders["audio"])
    M.map_stage2(net, ckpt["model"], args.ckpt)  # the file is already read: map it directly
    return net.eval().to(args.device), tokenizer


def video_stream_problem(path):
    """None when PyAV opens `path` as a video (data.not_a_video: a video stream, and no
    still picture), else why not."""
    try:
        container = data.open_media(path)
    except data.MediaError as e:
        return e.reason
    with container:
        return data.not_a_video(container)


def list_videos(paths):
    """-> (files to caption, [(path, why) of folder entries that are not videos]). Named
    files are all tried (their errors are reported when captioned); a folder's files are
    probed, whatever their extension, and a video's sidecar `<stem>.wav` is left out."""
    files, not_videos = [], []
    for p in paths:
        if not os.path.isdir(p):
            files.append(p)
            continue
        entries = sorted(os.path.join(p, f) for f in os.listdir(p))
        entries = [f for f in entries if os.path.isfile(f)]
        sidecars = {data.audio_source(f) for f in entries if data.audio_source(f) != f}
        for f in entries:
            if f in sidecars:
                continue  # the soundtrack of another file in this folder
            why = video_stream_problem(f)
            if why:
                not_videos.append((f, why))
            else:
                files.append(f)
    return files, not_videos


def caption_file(net, tokenizer, path, args):
    """-> (captions, has_audio). Raises data.MediaError for an unreadable file."""
    media = data.MediaConfig.from_model(net.cfg)
    video = data.preprocess_video(data.read_video_frames(path, media.num_frames), media.image_size)
    wave = data.read_audio(path)
    has_audio = wave is not None and wave.shape[-1] >= 400
    audio = data.preprocess_audio(wave, media.num_mel_bins, media.target_length) if has_audio else None
    torch.manual_seed(args.seed)
    ids = net.generate(video=video[None].to(args.device),
                       audio=audio[None].to(args.device) if has_audio else None,
                       num_captions=args.num_captions, **T.decoding_kwargs(args))
    return [tokenizer.decode(row) for row in ids.cpu()], has_audio


def main(argv=None):
    args = get_args(argv)
    args.device = T.setup_device(args.device)
    files, not_videos = list_videos(args.video)
    for path, why in not_videos:
        print(f"skipped, not readable as a video: {path}: {why}", file=sys.stderr)
    if not files:
        print("error: no video files found in " + " ".join(args.video), file=sys.stderr)
        return 2
    try:
        net, tokenizer = load_captioner(args)
    except (FileNotFoundError, KeyError, ValueError) as e:  # M.CheckpointError is both; one line, no traceback
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    as_jsonl = len(files) > 1 or os.path.isdir(args.video[0])
    failed = 0
    for path in files:
        try:
            captions, has_audio = caption_file(net, tokenizer, path, args)
        except data.MediaError as e:
            print(f"error: {e.path}: {e.reason}", file=sys.stderr)
            failed += 1
            continue
        if as_jsonl:
            print(json.dumps({"video": path, "captions": captions, "audio": has_audio}))
        else:
            if not has_audio:  # on stderr: stdout holds captions only
                print(f"(no audio track in {path}: captioned from the video alone)", file=sys.stderr)
            print("\n".join(captions))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
