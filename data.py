"""Data: reading real media files, the paper's preprocessing, the tokenizer, datasets, and
the embedded audio-visual dataset.

  1. decoding with PyAV (its wheels carry FFmpeg): frames at uniformly spaced indices, seeking
     in long files; the soundtrack (or a sidecar .wav), every channel, resampled to 16 kHz;
  2. preprocessing as the pipeline the released weights were trained with (the authors' data
     code, LanguageBind's video and audio processors, pytorchvideo's `short_side_scale`),
     each rule stated where it is applied: CLIP-normalised 224² frames, Kaldi fbank with
     three chunks as the spectrogram's channels. Two deliberate deviations, both MediaConfig
     fields: no random flip and no random audio chunk at evaluation (the original draws both
     there too);
  3. captions -> token ids: BERT's WordPiece with the [DEC] start token, as BLIP-2 captions;
     CLIP's byte-level BPE for LanguageBind's text tower;
  4. the authors' annotation format (several captions per clip allowed; converters from
     MSR-VTT and VATEX), a dataset of (clip, caption) pairs for training or of clips with all
     their references for evaluation that reports unreadable files instead of crashing or
     recursing, a collate function with modality masks, a skip tracker; the video files of a
     folder (probed, whatever their extension) as a dataset of clips to caption or rank; the
     DataLoader every loader of the project is, its workers started from a fork server;
  5. a generator of synthetic clips whose captions need both the frames and the sound.
"""

import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
import multiprocessing

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from tqdm import tqdm
from tokenizers import AddedToken, BertWordPieceTokenizer, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import BertPreTokenizer

from pretrained import bert_folder, tokenizer_folder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FBANK_MEAN, FBANK_STD = -4.2677393, 4.5689974  # the paper's spectrogram normalisation
SAMPLE_RATE = 16000


class MediaError(Exception):
    """A file that cannot be read; `reason` is short enough to count skips by."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# -----------------------------------------------------------------------------
# 1. Decoding


def open_media(path):
    """PyAV's container for `path`, or a MediaError saying why not (missing, empty, not
    something FFmpeg can open)."""
    if not os.path.exists(path):
        raise MediaError(path, "missing file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty file")
    try:
        return av.open(path)
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError(path, f"cannot open ({type(e).__name__})") from None


def not_a_video(container):
    """Why an opened media file is no video, or None. FFmpeg opens a still picture through an
    image demuxer (png_pipe, jpeg_pipe, image2, ...) as a one-frame video stream, and a
    one-frame video is a picture too (its header's frame count, where it has one, says so)."""
    if not container.streams.video:
        return "no video stream"
    if any(n.startswith("image2") or n.endswith("_pipe") for n in container.format.name.split(",")):
        return "a still image"
    if container.streams.video[0].frames == 1:
        return "a single frame"
    return None


def _frame_index(path, container, stream):
    """Presentation times of every video frame and of the key frames, from the packets alone
    (demuxing is cheap, decoding is not). The header's frame count is not trusted."""
    times, keys = [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.pts is None:
                continue
            times.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError as e:
        raise MediaError(path, f"corrupt stream ({type(e).__name__})") from None
    return sorted(times), sorted(keys)


def uniform_indices(n, num_frames):
    """The original's frame choice: `np.linspace(0, n - 1, num_frames, dtype=int)`, which
    truncates (10 frames, 8 wanted: 0 1 2 3 5 6 7 9, where rounding would give 0 1 3 4 5 6 8 9).
    `n` is the reader's frame count (ours counts the packets); fewer frames than asked repeat
    some."""
    return np.linspace(0, n - 1, num_frames, dtype=int).tolist()


SMALL_FILE_PIXELS = 64 * 64 * 400  # below this, one decoding pass beats indexing and seeking


_RGB = VideoReformatter()  # one per process: see _rgb


def _rgb(frame):
    """uint8 (H, W, 3). Every frame goes through the one reformatter of this process, which
    keeps its conversion context for as long as the frames' size and format stay the same:
    building a context is most of what converting a small frame costs (8 frames of 64x64:
    2.9 ms with a reformatter per file, 0.19 ms with this one, and 1.2 ms *a frame* with
    frame.to_ndarray(format="rgb24"), which builds one per call), for the same pixels. One
    thread: decoding already runs in one loader worker per core, and a context with a thread
    pool of its own would hang any process forked from this one after it ran (the pool's
    threads do not come along; see worker_context)."""
    return _RGB.reformat(frame, format="rgb24", threads=1).to_ndarray()


def _read_short(path, container, stream, num_frames):
    """One pass for small files: decode every frame (kept in the decoder's format), count
    them, convert only the chosen ones. The header's frame count only chose this path."""
    try:
        decoded = list(container.decode(stream))
    except av.FFmpegError as e:
        raise MediaError(path, f"decoding failed ({type(e).__name__})") from None
    if not decoded:
        raise MediaError(path, "no video frames")
    picks = uniform_indices(len(decoded), num_frames)
    return torch.from_numpy(np.stack([_rgb(decoded[i]) for i in picks]))


def read_video_frames_decode_all(path, num_frames):
    """The reference: decode and convert every frame, then pick the uniformly spaced ones.
    `read_video_frames` below returns the same frames, faster; this plain version is kept
    as its spec, its test oracle and bench.py's baseline."""
    container = open_media(path)
    try:
        frames = [_rgb(f) for f in container.decode(video=0)]
    except av.FFmpegError as e:
        raise MediaError(path, f"decoding failed ({type(e).__name__})") from None
    finally:
        container.close()
    if not frames:
        raise MediaError(path, "no video frames")
    return torch.from_numpy(np.stack([frames[i] for i in uniform_indices(len(frames), num_frames)]))


def read_video_frames(path, num_frames):
    """uint8 (T, H, W, 3) at uniformly spaced frame indices, as read_video_frames_decode_all.
    Only the chosen frames are converted to RGB; when the next wanted frame lies past a later
    key frame the decoder seeks there instead of decoding everything in between."""
    container = open_media(path)
    try:
        why = not_a_video(container)
        if why:
            raise MediaError(path, why)
        stream = container.streams.video[0]
        # decoder threads pay off on large frames; on small ones starting them costs more
        # than the decoding (16 frames of 64x64: 2.3 ms on one thread, 9.8 ms on "auto")
        if stream.codec_context.width * stream.codec_context.height >= 640 * 360:
            stream.thread_type = "AUTO"
        else:
            stream.codec_context.thread_count = 1
        w, h = stream.codec_context.width, stream.codec_context.height
        if (stream.frames or 10 ** 9) * w * h <= SMALL_FILE_PIXELS:
            return _read_short(path, container, stream, num_frames)
        times, keys = _frame_index(path, container, stream)
        if not times:
            raise MediaError(path, "no video frames")
        wanted = [times[i] for i in uniform_indices(len(times), num_frames)]
        frames, position, decoder = {}, None, None
        try:
            for target in sorted(set(wanted)):
                key = max([k for k in keys if k <= target], default=None)
                if decoder is None or (key is not None and position is not None and position < key):
                    container.seek(key if key is not None else target, stream=stream, backward=True)
                    decoder = container.decode(stream)
                for frame in decoder:
                    position = frame.pts
                    if frame.pts is not None and frame.pts >= target:
                        if frame.pts != target:
                            # the wanted frame never came out: the seek landed past it (MPEG-TS
                            # seeks are approximate and can skip a whole key-frame interval)
                            return _read_in_order(path, wanted)
                        frames[target] = _rgb(frame)
                        break
                else:
                    raise MediaError(path, "frames missing at the end")
        except av.FFmpegError as e:
            raise MediaError(path, f"decoding failed ({type(e).__name__})") from None
        return torch.from_numpy(np.stack([frames[t] for t in wanted]))
    finally:
        container.close()


def _read_in_order(path, wanted):
    """One decoding pass from the start, converting only the frames at the `wanted` times
    (each the first frame at or after its time): the fallback where seeking is not exact."""
    container = open_media(path)
    targets, frames = sorted(set(wanted)), {}
    try:
        for frame in container.decode(video=0):
            hits = [t for t in targets if frame.pts is not None and t <= frame.pts]
            if hits:
                image = _rgb(frame)
                frames.update((t, image) for t in hits)
                targets = targets[len(hits):]
            if not targets:
                break
    except av.FFmpegError as e:
        raise MediaError(path, f"decoding failed ({type(e).__name__})") from None
    finally:
        container.close()
    if targets:
        raise MediaError(path, "frames missing at the end")
    return torch.from_numpy(np.stack([frames[t] for t in wanted]))


def audio_source(path):
    """Where a clip's sound comes from: a sidecar `<stem>.wav` when there is one, else the file."""
    sidecar = os.path.splitext(path)[0] + ".wav"
    return sidecar if os.path.exists(sidecar) and sidecar != path else path


def read_audio(path, sample_rate=SAMPLE_RATE):
    """float32 (channels, N) at `sample_rate`, from a sidecar `<stem>.wav` when there is one,
    else from the file's own soundtrack; None when there is no audio stream.

    As the original's `torchaudio.load` + `torchaudio.functional.resample`: every channel is
    kept (no down-mix; log_mel reads channel 0), samples are decoded at the file's own rate
    as floats (16-bit PCM becomes x / 32768), and a rate other than `sample_rate` is resampled
    with `torchaudio.functional.resample` and its default windowed-sinc filter, not FFmpeg's."""
    source = audio_source(path)
    container = open_media(source)
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        # a format conversion only (planar float), at the native rate and layout
        to_float = av.AudioResampler(format="fltp")
        chunks, rate = [], None
        try:
            for frame in container.decode(stream):
                for out in to_float.resample(frame):
                    chunks.append(out.to_ndarray())
                    rate = out.sample_rate
            for out in to_float.resample(None):
                chunks.append(out.to_ndarray())
                rate = out.sample_rate
        except av.FFmpegError as e:
            raise MediaError(source, f"audio decoding failed ({type(e).__name__})") from None
        except ValueError:  # PyAV's resampler refuses a rate or layout that changes mid-stream
            raise MediaError(source, "audio format changes mid-stream") from None
    finally:
        container.close()
    if not chunks:
        return None
    wave = torch.from_numpy(np.concatenate(chunks, axis=1))  # (channels, N) float32
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave


# -----------------------------------------------------------------------------
# 2. Preprocessing


@dataclass
class MediaConfig:
    """Input sizes and the two places where evaluation deliberately differs from the original.

    flip_in_eval: the original's evaluation transform keeps its random horizontal flip
        (p = 0.5), so its scores move between runs. False (ours): no flip at evaluation.
        True: flip at random in evaluation as well, as the original does.
    random_chunks_in_eval: the original draws the three audio chunk starts at random in
        evaluation too. False (ours): the middle of each third (chunk_starts). True: random,
        as the original.
    Both draws come from the dataset's per-item generator, so even the original's behaviour is
    reproducible here."""

    num_frames: int = 8
    image_size: int = 224
    num_mel_bins: int = 112
    target_length: int = 1036
    sample_rate: int = SAMPLE_RATE
    flip_in_eval: bool = False
    random_chunks_in_eval: bool = False

    @classmethod
    def from_model(cls, cfg):
        """Sizes come from the model config, so the tiny preset runs this same code with the
        paper's rules (its 64x64 embedded frames halve exactly to 32x32, where a bilinear
        resize without antialias is a 2x2 average: nothing aliases)."""
        mel, length = cfg.audio.image_size
        return cls(cfg.video.num_frames, cfg.video.image_size[0], mel, length)

    def check(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.image_size < 1 or self.num_mel_bins < 1 or self.target_length < 1:
            raise ValueError(f"invalid media sizes: {self}")
        return self


def short_side_size(h, w, size):
    """pytorchvideo's `short_side_scale` size rule: the short side becomes `size`, the long
    side `floor(long / short * size)`, computed in that order in floating point (so a
    224x230 frame becomes 224x229: 230 / 224 * 224 falls just below 230)."""
    if w < h:
        return int(math.floor(h / w * size)), size
    return size, int(math.floor(w / h * size))


def preprocess_video(frames, size, train=False, generator=None):
    """uint8 (T, H, W, 3) -> float (3, T, size, size), the original's video transform:

      1. scale to [0, 1] and normalise with the CLIP mean / std;
      2. resize (short_side_size) with `F.interpolate(mode="bilinear", align_corners=False)`,
         no antialias and no clamp, as pytorchvideo's `short_side_scale`;
      3. torchvision's video centre crop: offsets `int(round((h - size) / 2))` (Python's
         round, half to even) and likewise for the width;
      4. `train=True` draws a horizontal flip with p = 0.5 (see MediaConfig.flip_in_eval).

    We normalise after the resize and crop, the original before: a bilinear resize is a
    weighted mean whose weights sum to one, so it commutes with the per-channel affine
    normalisation (the results agree to float rounding), and fewer pixels are normalised."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0  # (T, H, W, 3) -> (T, 3, H, W)
    h, w = short_side_size(*x.shape[-2:], size)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    if train and torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    return x.transpose(0, 1).contiguous()  # (T, 3, S, S) -> (3, T, S, S)


def log_mel(wave, num_mel_bins, sample_rate=SAMPLE_RATE):
    """Kaldi fbank with the paper's parameters: (channels, N) or (N,) waveform ->
    (frames, num_mel_bins). As the original: subtract the mean of the whole (channels, N)
    tensor, then `torchaudio.compliance.kaldi.fbank`, which reads a single channel (its
    `channel` argument defaults to -1, clamped to 0): a stereo file gives the spectrogram of
    its first (left) channel, not of a mix, with the mean taken over both channels."""
    wave = wave - wave.mean()
    return torchaudio.compliance.kaldi.fbank(
        wave if wave.dim() == 2 else wave[None], htk_compat=True, sample_frequency=sample_rate,
        use_energy=False, window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0,
        frame_length=25, frame_shift=10)


def chunk_starts(n, target_length, train=False, generator=None):
    """The three-chunk rule: split the valid start range [0, n - target_length] into three
    equal parts and take one start in each: random in training (as the original), each part's
    middle in evaluation (the original draws at random there too; see
    MediaConfig.random_chunks_in_eval). Shorter spectrograms are repeated to length, so all
    starts are 0."""
    if n <= target_length:
        return [0, 0, 0]
    parts = np.array_split(np.arange(n - target_length + 1), 3)
    starts = []
    for part in parts:
        if len(part) == 0:
            starts.append(0)
        elif train:
            starts.append(int(part[torch.randint(len(part), (), generator=generator)]))
        else:
            starts.append(int(part[len(part) // 2]))
    return starts


def preprocess_audio(wave, num_mel_bins, target_length, train=False, generator=None):
    """(channels, N) or (N,) 16 kHz waveform -> (3, num_mel_bins, target_length): the log-mel
    spectrogram (log_mel: channel 0), repeated to length when short, three chunks of it
    (chunk_starts) as channels, mel bins as height and time as width, normalised with the
    paper's `(x + 4.2677393) / (4.5689974 * 2)`."""
    spec = log_mel(wave, num_mel_bins)  # (n, mel)
    n = spec.size(0)
    if n < target_length:
        spec = spec.repeat(math.ceil(target_length / n), 1)[:target_length]
    chunks = [spec[s:s + target_length] for s in chunk_starts(spec.size(0), target_length, train, generator)]
    x = torch.stack(chunks).transpose(1, 2)  # (3, L, mel) -> (3, mel, L)
    return (x - FBANK_MEAN) / (FBANK_STD * 2)


# -----------------------------------------------------------------------------
# 3. Captions -> token ids: BERT's WordPiece tokenizer


class Tokenizer:
    """BERT WordPiece through the `tokenizers` package, plus the BOS token [DEC].

    Either bert-base-cased's own `vocab.txt` (28,996 entries; [DEC] becomes id 28,996) or,
    without BERT files, a WordPiece vocabulary trained on the training captions. A caption
    encodes as [DEC] w1 ... wn [SEP] (BERT's [CLS] replaced by [DEC], as the authors did)."""

    SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    def __init__(self, tok):
        self.tok = tok
        self.tok.add_special_tokens([AddedToken("[DEC]", special=True)])
        self.pad_id = tok.token_to_id("[PAD]")
        self.sep_id = tok.token_to_id("[SEP]")
        self.cls_id = tok.token_to_id("[CLS]")
        self.bos_id = tok.token_to_id("[DEC]")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_bert(cls, name):
        """BERT's vocab.txt from a folder (or the folder of a weights file), or from a Hugging
        Face repo id such as `google-bert/bert-base-cased` (see `bert_folder`). Casing follows
        the folder's tokenizer_config.json (`do_lower_case`, `strip_accents`), as HF's own
        tokenizer does: an uncased vocabulary read without lower-casing would turn every
        capitalised word into [UNK]. Without that setting, a vocabulary with no upper-case
        entry is taken as uncased, and stderr says which was chosen."""
        folder = bert_folder(name)
        path = os.path.join(folder, "vocab.txt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no BERT vocabulary at {path}")
        settings = {}
        config = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(config):
            with open(config) as f:
                settings = json.load(f)
        lower = settings.get("do_lower_case")
        if lower is None:
            with open(path, encoding="utf-8") as f:
                lower = not any(w != w.lower() for w in f.read().split() if not w.startswith("["))
            print(f"{folder}: no do_lower_case in tokenizer_config.json; the vocabulary is "
                  f"{'uncased: captions are lower-cased' if lower else 'cased: captions keep their case'}",
                  file=sys.stderr)
        # strip_accents None follows lowercase, as in HF's BertTokenizer
        return cls(BertWordPieceTokenizer(path, lowercase=bool(lower), strip_accents=settings.get("strip_accents")))

    @classmethod
    def train(cls, captions, vocab_size=1000):
        """A WordPiece vocabulary from `captions` (for training without BERT files): the special
        tokens, every character seen (alone and as a `##` continuation, so any word of the
        captions can be spelled), then whole words by falling count, ties alphabetical, up to
        `vocab_size`. Built by rule rather than by the tokenizers library's trainer, whose
        pieces and ids change from one call to the next (ties broken by hash order), so the
        same captions always give the same ids and a run with the same seed trains the same."""
        split = BertPreTokenizer().pre_tokenize_str  # BERT's word and punctuation split
        counts = Counter(w for c in captions for w, _ in split(c))
        chars = sorted({ch for w in counts for ch in w})
        vocab = cls.SPECIALS + ["[DEC]"] + chars + ["##" + ch for ch in chars]
        words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
        vocab += words[:max(0, vocab_size - len(vocab))]
        return cls(BertWordPieceTokenizer({w: i for i, w in enumerate(vocab)}, lowercase=False,
                                          strip_accents=False))

    @classmethod
    def load(cls, path):
        """A tokenizer saved by `save` (a tokenizers JSON file)."""
        return cls(HFTokenizer.from_file(path))

    @classmethod
    def from_string(cls, text):
        """A tokenizer stored inside a checkpoint (`Tokenizer.tok.to_str()`)."""
        return cls(HFTokenizer.from_str(text))

    def save(self, path):
        self.tok.save(path)

    def configure(self, cfg):
        """Set a model config's (model.UniQ4CapConfig) vocabulary size and special ids from
        this tokenizer."""
        q = cfg.qformer
        q.vocab_size, q.pad_token_id, q.sep_token_id, q.bos_token_id = (
            self.vocab_size, self.pad_id, self.sep_id, self.bos_id)
        return cfg

    def encode(self, captions, max_len=32):
        """list of str -> ids (B, T) and mask (B, T) bool, padded to the longest, at most
        max_len tokens including [DEC] and [SEP]."""
        rows = []
        for enc in self.tok.encode_batch(list(captions), add_special_tokens=False):
            rows.append([self.bos_id] + enc.ids[:max_len - 2] + [self.sep_id])
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids, ids != self.pad_id

    def decode(self, ids):
        """Token ids (without [DEC]) -> caption, stopping at the first [SEP]."""
        ids = [int(i) for i in ids]
        if self.sep_id in ids:
            ids = ids[:ids.index(self.sep_id)]
        return self.tok.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])



class ClipTokenizer:
    """CLIP's byte-level BPE, the tokenizer of LanguageBind's text tower, built through
    `tokenizers` from the `vocab.json` and `merges.txt` its repos hold, by the rules of CLIP's
    own tokenizer (transformers' `CLIPTokenizer`): the text NFC-normalised, its whitespace
    collapsed, lower-cased; split into letter runs, single digits, punctuation runs and the
    contractions 's 't 're 've 'm 'll 'd; each piece byte-encoded and merged by rank, a word's
    last piece ending in `</w>`. A text encodes as <|startoftext|> pieces <|endoftext|>, at most
    77 tokens, padded with <|endoftext|>: the text tower pools at the first one."""

    SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, vocab, merges):
        self.tok = HFTokenizer(BPE(vocab, merges, end_of_word_suffix="</w>", unk_token="<|endoftext|>",
                                   fuse_unk=False))
        self.tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                    normalizers.Lowercase()])
        self.tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.SPLIT), behavior="removed", invert=True),  # keep the matches
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self.tok.decoder = decoders.ByteLevel()
        self.bos_id, self.eos_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.vocab_size = len(vocab)

    @classmethod
    def from_folder(cls, name):
        """vocab.json and merges.txt from a folder (or the folder of a weights file), or from a
        Hugging Face repo id such as `LanguageBind/LanguageBind_Video_FT`."""
        folder = tokenizer_folder(name, ["vocab.json", "merges.txt"])
        vocab, merges = BPE.read_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
        return cls(vocab, merges)

    def encode(self, texts, max_len=77):
        """list of str -> ids (B, L), padded to the longest with <|endoftext|>."""
        rows = [[self.bos_id] + e.ids[:max_len - 2] + [self.eos_id]
                for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        ids = torch.full((len(rows), max(len(r) for r in rows)), self.eos_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids


# -----------------------------------------------------------------------------
# 4. Datasets


class DataError(ValueError):
    """The data a run was pointed at cannot be used: an annotation file that is not JSON, a
    record without its caption field, a split where no clip can be read. The scripts print it
    as one `error: ...` line and exit with code 2 (training.run_script)."""


class UnreadableClips(DataError, RuntimeError):
    """Too many clips could not be read (SkipTracker, training.batches_forever); the message
    carries the skip report: how many clips, and why."""


AUTHORS_CAPTION_FIELD = "sound_mplug"  # the audio-visual caption the authors trained on


def _refuse_one_object(path, text):
    """A file that is one JSON object without an `id` is a wrapper (MSR-VTT's {"videos",
    "sentences"}, say), not records: say what the file must hold. (A one-line JSON Lines
    file is one object too, but a record, with its `id`.)"""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:  # JSON Lines (more than one value), or not JSON
        return
    if isinstance(whole, dict) and "id" not in whole:
        raise DataError(f"{path}: one JSON object (fields: {', '.join(map(str, whole)) or 'none'}), but the file "
                        f"must hold a list of records, each with 'id' and a caption field (or JSON Lines, "
                        f"one record per line)")


def load_annotations(path, caption_field="caption"):
    """The authors' format: a JSON list of records, each with an `id` (the media file's stem)
    and caption fields; JSON Lines also accepted. A caption field holds one caption or a list
    of them (several references of one clip, as MSR-VTT and VATEX give); a clip's `id` may
    also repeat, each record adding its captions. caption_field=None checks only the ids.
    Fails with a one-line DataError that names the file (and, for a missing field, the fields
    the record does have)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            _refuse_one_object(path, text)
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON or JSON Lines ({e.msg} at line {e.lineno})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i} is not an object")
        missing = [f for f in ("id", caption_field) if f is not None and f not in r]
        if missing:
            raise DataError(f"{path}: record {i} lacks {' and '.join(repr(f) for f in missing)}; "
                            f"its fields: {', '.join(map(str, r)) or 'none'}")
        if caption_field is not None:
            c = r[caption_field]
            if not (isinstance(c, str) or (isinstance(c, list) and c and all(isinstance(x, str) for x in c))):
                raise DataError(f"{path}: record {i}: '{caption_field}' is neither a caption nor a list of them")
    return records


def caption_field_for(path, given=None):
    """Which field the captions come from: `given` when the user named one; else
    `sound_mplug` when the file's first record has it (the authors' annotations, whose
    `caption`-like fields are not what they trained on); else `caption`.
    Returns (field, why) so the scripts can say what they chose."""
    if given:
        return given, "--caption-field"
    first = load_annotations(path, None)[0]
    if AUTHORS_CAPTION_FIELD in first:
        return AUTHORS_CAPTION_FIELD, f"the records have '{AUTHORS_CAPTION_FIELD}', the authors' training caption"
    return "caption", f"the records have no '{AUTHORS_CAPTION_FIELD}'"


def captions_of(record, field):
    """A record's captions as a list (a field holds one caption or a list of them)."""
    c = record[field]
    return [c] if isinstance(c, str) else list(c)


def caption_pairs(records, field):
    """One record per (clip, caption) pair, what training sees: a record whose field holds a
    list becomes one copy per caption, each with that one caption in `field`."""
    return [{**r, field: c} for r in records for c in captions_of(r, field)]


def references_by_clip(records, field):
    """{clip id: [every caption of that clip]}, clips in order of first appearance: the
    references a generated caption is scored against."""
    refs = {}
    for r in records:
        refs.setdefault(r["id"], []).extend(captions_of(r, field))
    return refs


def clip_records(records, field):
    """One record per clip (its first), what evaluation captions, with the clip's first
    caption in `field`; references_by_clip holds the others."""
    refs, first = references_by_clip(records, field), {}
    for r in records:
        first.setdefault(r["id"], r)
    return [{**first[i], field: refs[i][0]} for i in refs]


def from_msrvtt(info, split=None):
    """MSR-VTT's `videodatainfo.json` ({"videos": [{"video_id", "split", ...}],
    "sentences": [{"video_id", "caption", ...}]}, loaded) -> annotation records
    {"id": video_id, "caption": [its 20 captions]}, optionally only the videos of one split
    ("train", "validate" or "test"). The media files are then `<video_id>.mp4`."""
    keep = {v["video_id"] for v in info["videos"] if split is None or v.get("split") == split}
    caps = {}
    for s in info["sentences"]:
        if s["video_id"] in keep:
            caps.setdefault(s["video_id"], []).append(s["caption"])
    return [{"id": vid, "caption": caps[vid]} for vid in sorted(keep) if vid in caps]


def from_vatex(items):
    """VATEX's annotation list ([{"videoID": ..., "enCap": [10 English captions], ...}],
    loaded) -> annotation records {"id": videoID, "caption": enCap}. VATEX's ids name the
    YouTube video and the clip's start and end (`<youtube id>_<start>_<end>`); the media
    files must be named `<videoID>.mp4`."""
    return [{"id": v["videoID"], "caption": list(v["enCap"])} for v in items]


def item_generator(seed, epoch, i):
    """The generator of item i's random draws in an epoch, whichever process loads it: every
    dataset's augmentation is reproducible and resumable from (seed, epoch, index) alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + i)


class AVCaptionDataset(torch.utils.data.Dataset):
    """Clips `data_dir/<id>.mp4` (sound from `<id>.wav` when present) with their captions.
    Items: one per (clip, caption) pair, what training sees; with by_clip=True one per clip,
    what evaluation captions once and scores against `references[id]`, every caption of that
    clip. `records` holds one record per item, its caption in `caption_field`.
    An unreadable clip does not raise: its item carries `error = (path, reason)` and the
    collate function drops it, so a training loop can count and report skips."""

    def __init__(self, annotations, data_dir, media: MediaConfig, caption_field="caption",
                 train=False, modalities="video+audio", seed=0, by_clip=False):
        media.check()
        if modalities not in ("video+audio", "video", "audio"):
            raise ValueError(f"unknown modalities {modalities!r}")
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data folder not found: {data_dir}")
        records = load_annotations(annotations, caption_field)
        self.references = references_by_clip(records, caption_field)
        self.records = clip_records(records, caption_field) if by_clip else caption_pairs(records, caption_field)
        self.data_dir, self.media, self.caption_field = data_dir, media, caption_field
        self.train, self.modalities, self.seed = train, modalities, seed
        self.epoch = 0

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        """Training augmentation draws from (seed, epoch, index): reproducible and resumable,
        whatever worker loads the item."""
        self.epoch = epoch

    def item_generator(self, i):
        """Item i's random draws in this epoch, in order: the flip, then the audio chunks."""
        return item_generator(self.seed, self.epoch, i)

    def media_path(self, clip_id):
        return os.path.join(self.data_dir, f"{clip_id}.mp4")

    def __getitem__(self, i):
        rec = self.records[i]
        path = self.media_path(rec["id"])
        item = {"id": rec["id"], "caption": rec[self.caption_field], "record": rec, "path": path}
        try:
            item.update(decode_clip(path, self.media, self.modalities, self.train, self.item_generator(i)))
        except MediaError as e:
            return {"id": rec["id"], "error": (e.path, e.reason)}
        return item


def decode_clip(path, media, modalities="video+audio", train=False, generator=None):
    """One clip's model inputs, as every dataset and sample.py give them: "video"
    (3, T, S, S) unless modalities is "audio"; unless it is "video", "audio_missing" (no
    soundtrack, or one shorter than a single fbank window) and, when there is one, "audio"
    (3, mel, L). Augmentation as MediaConfig says for training or evaluation, drawn from
    `generator`. Raises MediaError for an unreadable file, and for a file without sound when
    only the audio is asked for."""
    m, out = media, {}
    if modalities != "audio":
        frames = read_video_frames(path, m.num_frames)
        out["video"] = preprocess_video(frames, m.image_size, train or m.flip_in_eval, generator)
    if modalities == "video":
        return out
    wave = read_audio(path)
    if modalities == "audio" and wave is None:
        raise MediaError(path, "no audio stream")
    out["audio_missing"] = wave is None or wave.shape[-1] < 400  # shorter than one window
    if not out["audio_missing"]:
        out["audio"] = preprocess_audio(wave, m.num_mel_bins, m.target_length, train or m.random_chunks_in_eval,
                                        generator)
    return out


def collate(batch):
    """Stack the readable items. Missing modalities are zeros with a False mask; a modality
    the dataset does not read at all is None. Returns a dict with ids, video (B, 3, T, H, W),
    audio (B, 3, mel, L), video_mask (B,), audio_mask (B,), captions, records, skipped
    [(path, reason)], missing_audio (count)."""
    good = [b for b in batch if "error" not in b]
    out = {"skipped": [b["error"] for b in batch if "error" in b],
           "ids": [b["id"] for b in good], "captions": [b["caption"] for b in good],
           "records": [b["record"] for b in good], "paths": [b["path"] for b in good],
           "missing_audio": sum(bool(b.get("audio_missing")) for b in good)}
    for name in ("video", "audio"):
        present = [name in b for b in good]
        reads = any(present) or any(f"{name}_missing" in b for b in good)
        if not good or not reads:
            out[name], out[f"{name}_mask"] = None, None
            continue
        shape = next((b[name].shape for b in good if name in b), None)
        if shape is None:  # nobody in this batch has it: the masks say so
            out[name], out[f"{name}_mask"] = None, torch.zeros(len(good), dtype=torch.bool)
            continue
        out[name] = torch.stack([b[name] if name in b else torch.zeros(shape) for b in good])
        out[f"{name}_mask"] = torch.tensor(present)
    return out



def worker_context():
    """How every worker process of the project starts (loader workers, the generator's pool):
    forked from a fork server, never from the calling process. A process forked after threads
    have run in it (torch's intra-op pool, FFmpeg's, tqdm's monitor; any test session, any
    caller that used torch first) inherits every lock as it stood at the fork, and a lock held
    by a thread that did not come along is never released: the child hangs. The fork server is
    a fresh interpreter that imports this module (and so torch) once and runs no threads; each
    worker is a fork of it, so a worker starts in milliseconds, not in the seconds an import
    of torch takes under spawn. Spawn where a platform has no fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # "__main__": a dataset class or collate function defined in the script that runs
    # pickles as __main__.X, which the workers must be able to import
    ctx.set_forkserver_preload(["__main__", "data"])
    return ctx


def loader(dataset, num_workers=0, collate_fn=collate, **kwargs):
    """torch's DataLoader, its workers started by worker_context(). Every loader of the project
    is made here; **kwargs are DataLoader's (batch_size, sampler, batch_sampler, ...)."""
    return torch.utils.data.DataLoader(dataset, num_workers=num_workers, collate_fn=collate_fn,
                                       multiprocessing_context=worker_context() if num_workers else None,
                                       **kwargs)


def video_stream_problem(path):
    """None when PyAV opens `path` as a video (not_a_video: a video stream, and no
    still picture), else why not."""
    try:
        container = open_media(path)
    except MediaError as e:
        return e.reason
    with container:
        return not_a_video(container)


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
        sidecars = {audio_source(f) for f in entries if audio_source(f) != f}
        for f in entries:
            if f in sidecars:
                continue  # the soundtrack of another file in this folder
            why = video_stream_problem(f)
            if why:
                not_videos.append((f, why))
            else:
                files.append(f)
    return files, not_videos


class VideoFiles(torch.utils.data.Dataset):
    """The files to caption, decoded and preprocessed as evaluation does (decode_clip),
    one item per file in collate's format; an unreadable file becomes an item carrying
    its error, which the collate function sets aside."""

    def __init__(self, files, media, seed=0):
        self.files, self.media, self.seed = files, media, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:  # draws only for the original's random evaluation transforms (MediaConfig), if on
            item = decode_clip(path, self.media, generator=item_generator(self.seed, 0, i))
        except MediaError as e:
            return {"id": i, "error": (e.path, e.reason)}
        return {"id": i, "path": path, "caption": None, "record": None, **item}

class SkipTracker:
    """Counts what the loader skipped: names each file once, with its reason, in one stderr
    line per batch (at most NAMED_PER_LINE files, then a count: a data set whose files are all
    missing gives one line per batch, not one per clip), reports per-reason counts each
    epoch, and stops training when too large a fraction is unreadable (after at least
    `min_items`, so one bad file in the first batch does not stop a run)."""

    NAMED_PER_LINE = 3

    def __init__(self, max_skip_fraction=0.05, min_items=100):
        self.max_skip_fraction, self.min_items = max_skip_fraction, min_items
        self.named = set()
        self.reset()

    def reset(self):
        self.seen, self.reasons, self.missing_audio = 0, Counter(), 0

    def update(self, batch):
        self.seen += len(batch["ids"]) + len(batch["skipped"])
        self.missing_audio += batch["missing_audio"]
        new = []
        for path, reason in batch["skipped"]:
            self.reasons[reason] += 1
            if path not in self.named:
                self.named.add(path)
                new.append(f"{path} ({reason})")
        if new:
            more = len(new) - self.NAMED_PER_LINE
            # (tqdm.write keeps the line off a training progress bar)
            tqdm.write("skipped " + ", ".join(new[:self.NAMED_PER_LINE])
                       + (f" and {more} more (counted in the epoch report)" if more > 0 else ""), file=sys.stderr)
        skipped = sum(self.reasons.values())
        if self.seen >= self.min_items and skipped > self.max_skip_fraction * self.seen:
            raise UnreadableClips(f"{skipped} of {self.seen} clips unreadable, above the limit of "
                               f"{self.max_skip_fraction:.0%}: {self.report()}")

    def report(self):
        skipped = sum(self.reasons.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()) or "none"
        return (f"{self.seen} clips, {skipped} skipped ({reasons}), "
                f"{self.missing_audio} without audio")


# -----------------------------------------------------------------------------
# 5. The embedded audio-visual dataset
#
# Each clip shows one coloured shape moving over a dark background while it sounds a tone,
# over a background sound. Colour is only visible; the background is only audible; the shape
# and its motion are both seen and heard: the shape sets the tone's pitch, and the tone
# glides up or down half an octave as the shape moves up or down, or swells or fades as it
# comes closer or goes away. Those four are the caption's attributes. What ties *this*
# video to *this* soundtrack is a third shared thing, never captioned: the clip is cut into
# EVENT_SLOTS equal slots, and in a random EVENT_LIT of them the scene flashes (the
# background lights up) while a burst of crackle sounds, with one per-clip strength for both
# (brighter flash, louder crackle). 56 flash patterns times the shape, the motion and the
# strength: only an encoder pair that matches the two in time, clip by clip, retrieves a
# clip's own soundtrack among 300. The patterns are few on purpose: a batch of 128 holds
# about two clips of each, so from the first steps the contrastive loss must also tell them
# apart by the shape and the motion (with 238 patterns the towers learnt the flashes first
# and the shared attributes late; docs/embedded-data.md). The tiny preset samples one frame per slot, and
# its audio window (208 fbank frames) holds the whole 2 s clip (203 frames as decoded), so the
# three-chunk rule takes the whole clip three times and no slot is cut or shifted.

ATTRIBUTES = {
    "shape": ["circle", "cross", "triangle"],
    "colour": ["red", "green", "blue", "yellow"],
    "motion": ["up", "down", "closer", "away"],
    "background": ["rain", "hum", "birds", "silence"],
}
CROSS_MODAL_ATTRIBUTES = ["shape", "motion"]  # seen and heard; colour is only seen, the background only heard
PITCH = {"circle": ("low", 330.0), "cross": ("middle", 880.0), "triangle": ("high", 2000.0)}
RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 220, 40)}
BACKGROUND_PHRASE = {"rain": "rain in the background", "hum": "a hum in the background",
                     "birds": "birds singing in the background", "silence": "no background sound"}
CLIP_SECONDS, FPS, SIZE = 2.0, 8, 64
EVENT_SLOTS = 8  # = the tiny preset's frames: frame t of the 8 sampled lies in slot t
EVENT_LIT = 3  # lit slots per clip: C(8, 3) = 56 patterns, and 5 quiet slots for the background
# Bumped whenever the clips change, so a copy made by older code is rebuilt, never mixed
DATASET_VERSION = 3
DEFAULT_EMBEDDED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "embedded")
SPLITS = {"train": 2400, "val": 300, "test": 300}


def captions_for(a):
    bg = BACKGROUND_PHRASE[a["background"]]
    return {"caption": f"a {a['colour']} {a['shape']} moves {a['motion']} with {bg}",
            "caption_video": f"a {a['colour']} {a['shape']} moves {a['motion']}",
            "caption_audio": f"a {PITCH[a['shape']][0]} tone sounds with {bg}"}


def parse_attributes(caption):
    """Read attribute values back from a (generated) caption; None where it names none or
    several. A pitch word counts for the shape it belongs to."""
    words = caption.lower().replace(",", " ").split()
    found = {}
    for name, values in ATTRIBUTES.items():
        hits = {v for v in values if v in words} if name != "background" else set()
        if name == "shape":
            hits |= {s for s, (word, _) in PITCH.items() if f"{word} tone" in caption.lower()}
        if name == "motion":
            hits = {v for v in values if f"moves {v}" in caption.lower()}
        if name == "background":
            hits = {v for v, phrase in BACKGROUND_PHRASE.items() if phrase in caption.lower()}
        found[name] = hits.pop() if len(hits) == 1 else None
    return found


def draw_events(rng):
    """The clip's flash pattern, a tuple of EVENT_SLOTS booleans with EVENT_LIT set (the
    others are quiet: the background is heard there), and its strength in [0, 1]."""
    lit = set(rng.choice(EVENT_SLOTS, EVENT_LIT, replace=False).tolist())
    return tuple(k in lit for k in range(EVENT_SLOTS)), float(rng.uniform(0, 1))


def slot_of_frame(t, num_frames):
    """The event slot frame t of `num_frames` (at FPS over CLIP_SECONDS) lies in."""
    return t * EVENT_SLOTS // num_frames


def _draw_frames(a, events, rng):
    """uint8 (T, SIZE, SIZE, 3): the shape moving up or down, or growing (closer) or
    shrinking (away), over a background that lights up in the event slots. No left/right:
    training's random horizontal flip would contradict the caption, and every shape is
    left-right symmetric for the same reason."""
    T = int(CLIP_SECONDS * FPS)
    slots, strength = events
    colour = np.clip(np.array(RGB[a["colour"]]) + rng.integers(-20, 21, 3), 0, 255)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = rng.integers(20, 50)  # background brightness
    flash = base + int(60 + 100 * strength)  # a lit slot's background
    lane = rng.uniform(20, SIZE - 20)
    # sizes that keep the shape legible at the tiny preset's 32x32, where a patch is 16x16
    # of these pixels: at least 8 pixels of radius (4 at 32x32)
    if a["motion"] in ("up", "down"):
        r0 = r1 = 14.0
        y0, y1 = rng.uniform(14, 19), rng.uniform(SIZE - 19, SIZE - 14)
        if a["motion"] == "up":
            y0, y1 = y1, y0
    else:
        y0 = y1 = rng.uniform(26, SIZE - 26)
        r0, r1 = rng.uniform(8, 10), rng.uniform(21, 24)
        if a["motion"] == "away":
            r0, r1 = r1, r0
    frames = np.empty((T, SIZE, SIZE, 3), dtype=np.uint8)
    for t in range(T):
        s = t / (T - 1)
        r, cy = r0 + (r1 - r0) * s, y0 + (y1 - y0) * s
        dx, dy = xx - lane, yy - cy
        if a["shape"] == "circle":
            mask = dx ** 2 + dy ** 2 <= r ** 2
        elif a["shape"] == "cross":  # a plus sign: a square was too like the circle at 32x32
            mask = ((np.abs(dx) <= r) & (np.abs(dy) <= 0.4 * r)) | ((np.abs(dx) <= 0.4 * r) & (np.abs(dy) <= r))
        else:  # a triangle pointing up
            mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        img = np.full((SIZE, SIZE, 3), flash if slots[slot_of_frame(t, T)] else base, dtype=np.uint8)
        img[mask] = colour
        frames[t] = img
    return frames


def _synth_audio(a, events, rng):
    """float32 (N,) at 16 kHz: the shape's tone (with a little vibrato), following its
    motion, over the background, and a burst of crackle (white noise) in each event slot,
    0.2 s from the slot's start. The glides stay within the shape's own pitch band: the
    bands (about 320-480, 600-1,280 and 1,380-2,900 Hz) do not overlap."""
    n = int(CLIP_SECONDS * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    along = t / CLIP_SECONDS  # 0 -> 1 over the clip, as the frames' motion
    octaves = {"up": 0.5 * along, "down": -0.5 * along}.get(a["motion"], 0 * along)
    freq = PITCH[a["shape"]][1] * rng.uniform(0.97, 1.03) * 2 ** octaves  # (N,) Hz
    loud = {"closer": 0.08 + 0.27 * along, "away": 0.35 - 0.27 * along}.get(a["motion"], 0.25 + 0 * along)
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE  # a gliding tone: the integral of its frequency
    tone = loud * np.sin(phase + 0.3 * np.sin(2 * np.pi * 5 * t))
    bg = np.zeros(n)
    if a["background"] == "rain":
        bg = rng.normal(0, 0.06, n)
    elif a["background"] == "hum":
        f0 = rng.uniform(100, 130)
        bg = 0.12 * np.sin(2 * np.pi * f0 * t) + 0.06 * np.sin(2 * np.pi * 2 * f0 * t)
    elif a["background"] == "birds":
        for start in rng.uniform(0, CLIP_SECONDS - 0.15, 6):
            s, e = int(start * SAMPLE_RATE), int((start + 0.12) * SAMPLE_RATE)
            tt = t[s:e] - t[s]
            f = rng.uniform(3500, 4500) + 4000 * tt  # an upward chirp
            bg[s:e] += 0.12 * np.sin(2 * np.pi * f * tt) * np.hanning(e - s)
    slots, strength = events
    slot_len, burst_len = n // EVENT_SLOTS, int(0.2 * SAMPLE_RATE)
    ramp = np.minimum(1, np.minimum(np.arange(burst_len), np.arange(burst_len)[::-1]) / 80)  # 5 ms edges
    crackle = np.zeros(n)
    for k, lit in enumerate(slots):
        if lit:
            crackle[k * slot_len:k * slot_len + burst_len] = rng.normal(0, 0.1 + 0.2 * strength, burst_len) * ramp
    return (tone + bg + crackle).astype(np.float32)


def write_clip(path, frames, wave, fps=FPS, sample_rate=SAMPLE_RATE):
    """Mux uint8 frames (T, H, W, 3) as H.264 and a mono waveform (or None) as AAC into an mp4.
    One encoder thread, so the same input gives the same bytes."""
    with av.open(path, "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.codec_context.thread_count = 1
        vs.options = {"preset": "ultrafast", "tune": "zerolatency"}
        if wave is not None:
            aus = out.add_stream("aac", rate=sample_rate, layout="mono")
            aus.options = {"aac_coder": "fast"}  # several times faster to encode
        for f in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if wave is not None:
            step = aus.codec_context.frame_size or 1024
            for i in range(0, len(wave), step):
                chunk = np.zeros((1, step), dtype=np.float32)
                piece = wave[i:i + step]
                chunk[0, :len(piece)] = piece
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = sample_rate, i
                for packet in aus.encode(frame):
                    out.mux(packet)
            for packet in aus.encode():
                out.mux(packet)


def write_test_clip(path, seconds, width, height, fps=25, audio=True, seed=0):
    """A plain moving gradient with a tone, for decoding tests and benchmarks."""
    rng = np.random.default_rng(seed)
    T = int(seconds * fps)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    frames = np.empty((T, height, width, 3), dtype=np.uint8)
    for t in range(T):
        frames[t] = ((x + y * 0.5 + 8 * t + rng.normal(0, 2, (1, 1, 3))) % 256).astype(np.uint8)
    wave = None
    if audio:
        tt = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        wave = (0.2 * np.sin(2 * np.pi * 440 * tt)).astype(np.float32)
    write_clip(path, frames, wave, fps=fps)


def _make_one(job):
    root, clip_id, seed, index = job
    rng = np.random.default_rng([seed, index])
    a = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
    events = draw_events(rng)
    write_clip(os.path.join(root, f"{clip_id}.mp4"), _draw_frames(a, events, rng), _synth_audio(a, events, rng))
    return {"id": clip_id, **captions_for(a), "attributes": a,
            "events": {"slots": [int(x) for x in events[0]], "strength": round(events[1], 4)}}


def make_embedded_dataset(root, splits=None, seed=0, workers=2, progress=True):
    """Write the clips and `train.json`, `val.json`, `test.json` (the authors' format plus the
    video-only and audio-only captions and the attribute labels). Deterministic by seed."""

    splits = splits or SPLITS
    os.makedirs(root, exist_ok=True)
    # an older or half-made copy goes first, so no file of it survives among the new ones
    stale = [f for f in os.listdir(root) if f == "COMPLETE" or re.fullmatch(r"\w+(_\d{5}\.mp4|\.json)", f)]
    for name in sorted(stale, key=lambda f: f != "COMPLETE"):  # the marker first
        os.remove(os.path.join(root, name))
    jobs, index = [], 0
    for split, count in splits.items():
        for _ in range(count):
            jobs.append((root, f"{split}_{index:05d}", seed, index))
            index += 1
    with worker_context().Pool(workers) as pool:
        records = list(tqdm(pool.imap(_make_one, jobs, chunksize=16), total=len(jobs),
                            desc="generating embedded clips", disable=not progress))
    start = 0
    for split, count in splits.items():
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(records[start:start + count], f, indent=1)
        start += count
    with open(os.path.join(root, "COMPLETE"), "w") as f:  # written last: a half-made set is redone
        json.dump(embedded_marker(seed, splits), f)
    return root


def embedded_marker(seed=0, splits=None):
    """What the COMPLETE file of a finished copy holds: a copy is reused only when it matches."""
    return {"version": DATASET_VERSION, "seed": seed, "splits": splits or SPLITS}


def ensure_embedded_dataset(root=DEFAULT_EMBEDDED_ROOT, seed=0):
    """The embedded dataset, generated on first use."""
    marker, wanted = os.path.join(root, "COMPLETE"), embedded_marker(seed)
    if not os.path.exists(marker):
        print(f"generating the embedded dataset in {root} (first use)")
    else:
        with open(marker) as f:
            found = json.load(f)
        if found == wanted:
            return root
        print(f"rebuilding the embedded dataset in {root}: it was made as version {found.get('version', 1)}, "
              f"seed {found.get('seed')}; this code makes version {DATASET_VERSION}, seed {seed}")
    return make_embedded_dataset(root, seed=seed)
