"""Caches of what does not change between epochs: the frozen encoders' outputs in stage 2
(`train_caption.py --cache-features`) and the decoded, preprocessed inputs in stage 1
(`train_align.py --cache-inputs`).

In stage 2 the encoders are frozen, so with evaluation-mode preprocessing (no flip, the
middle audio chunks) a clip's encoder outputs never change: they are computed once, stored
on disk in fp16, and training then runs only the Q-Former. At the paper's shapes the frozen
encoders are most of a step's FLOPs, so this is the largest speed-up stage 2 has; the price
is the training augmentation (random flip, random audio chunk), which a cache cannot keep.
In stage 1 the encoders learn, but decoding a clip and computing its spectrogram is most of
a tiny step's time: the same cache, holding the encoders' inputs instead of their outputs
(`inputs=True`), decodes each clip once; the flip is applied to the cached pixels in
training, and only the random choice of audio chunks is given up.

Layout, one folder per (encoder weights or "inputs", preprocessing, modalities, clip list):

    <root>/<key>/video.npy   (N, Nv, Dv) fp16, memory-mapped   Nv = frames * (patches + 1)
                             (inputs: (N, 3, frames, size, size))
    <root>/<key>/audio.npy   (N, Na, Da) fp16, memory-mapped   (inputs: (N, 3, mel, length))
    <root>/<key>/state.npy   (N,) int8: TODO, OK, NO_AUDIO or UNREADABLE
    <root>/<key>/files.npy   (N, 4) int64: (size, mtime_ns) of the file and of its sidecar .wav
    <root>/<key>/errors-<rank>.json   why the unreadable clips failed

`key` hashes everything the entries depend on except the media files themselves; each
entry also remembers the files it was computed from (the clip and a sidecar .wav), and an
entry whose files changed since is computed again. Entries are written as they are computed, so an interrupted build loses
nothing: the next run finishes what is missing.
"""

import hashlib
import json
import os
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import data
import training as T

VERSION = 3  # bump when the layout or what an entry means changes
TODO, OK, NO_AUDIO, UNREADABLE = 0, 1, 2, 3


def file_identity(path):
    """(size, mtime_ns) of a file, or (-1, -1) when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def clip_identity(path):
    """What a row is computed from: the media file and the sidecar .wav its sound may come
    from instead (data.audio_source), as (size, mtime_ns, wav size, wav mtime_ns)."""
    sound = data.audio_source(path)
    return (*file_identity(path), *(file_identity(sound) if sound != path else (-1, -1)))


def encoder_fingerprint(towers, modalities, dtype):
    """sha256 over the frozen encoders a cache depends on, and the dtype the features are
    computed in; computed once per run and handed to each split's FeatureCache. `towers`
    maps "video" / "audio" to what its tower is: (weights file, tower config) (the file's
    bytes are hashed with the config, so a run whose caches are complete never has to build
    the tower), or a built `VisionTransformer` (every parameter and buffer is hashed: a
    run's own initialisation, which has no file to read)."""
    h = hashlib.sha256(f"v{VERSION} {dtype}".encode())
    for name in ("video", "audio"):
        if name not in modalities:
            continue
        tower = towers[name]
        if isinstance(tower, torch.nn.Module):
            for k, t in sorted(tower.state_dict().items()):
                t = t.detach().to("cpu").contiguous()
                h.update(f"{name}.{k} {tuple(t.shape)} {t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            path, cfg = tower
            h.update(f"{name} file {json.dumps(asdict(cfg), sort_keys=True)}".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def cache_key(encoders, media, modalities, ids):
    """The folder name: encoders' fingerprint, preprocessing config, modalities, clip list."""
    spec = json.dumps({"version": VERSION, "encoders": encoders, "media": asdict(media),
                       "modalities": modalities, "ids": ids}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


class FeatureCache(torch.utils.data.Dataset):
    """The encoder outputs of an evaluation-mode `data.AVCaptionDataset`, as a dataset whose
    items look like that dataset's but carry tokens instead of pixels: item["video"] is
    (Nv, Dv) and item["audio"] (Na, Da), in fp16, so `data.collate` stacks them unchanged and
    the model takes them as `video_tokens` / `audio_tokens`. One row per media file: records
    that share a clip (several captions of one video) share its row."""

    def __init__(self, root, dataset: data.AVCaptionDataset, cfg, fingerprint, inputs=False, flip=False):
        if dataset.train:
            raise ValueError("a feature cache needs evaluation-mode preprocessing (train=False): "
                             "training augmentation would be frozen into the cache")
        if cfg.frozen_patch_dropout and not inputs:
            raise ValueError("frozen_patch_dropout makes the encoder outputs random: they cannot be cached")
        # flip (inputs only): training's random flip, applied to the cached frames with the
        # draw the dataset would have made (its item_generator), so it matches decoding
        self.inputs, self.flip = inputs, flip and inputs
        self.dataset = dataset
        self.modalities = [m for m in ("video", "audio") if m in dataset.modalities]
        first = {}  # clip id -> its first record
        for i, r in enumerate(dataset.records):
            first.setdefault(r["id"], i)
        self.clips = list(first)
        self.first_record = list(first.values())
        row_of = {c: k for k, c in enumerate(self.clips)}
        self.row = [row_of[r["id"]] for r in dataset.records]  # record -> cache row
        self.dir = os.path.join(root, cache_key(fingerprint, dataset.media, dataset.modalities, self.clips))
        n = len(self.clips)
        if inputs:  # what data.preprocess_video / preprocess_audio return
            self.shapes = {"video": (n, cfg.video.num_channels, cfg.video.num_frames, *cfg.video.image_size),
                           "audio": (n, cfg.audio.num_channels, *cfg.audio.image_size)}
        else:
            self.shapes = {"video": (n, cfg.video.num_frames * cfg.video.tokens_per_frame, cfg.video.width),
                           "audio": (n, cfg.audio.tokens_per_frame, cfg.audio.width)}
        self._arrays = None  # opened lazily, once per process (data loader workers included)
        self._errors = None

    def __getstate__(self):
        # a loader worker started by spawn (macOS, Windows) maps the files itself instead of
        # receiving a pickled copy of every array
        return {**self.__dict__, "_arrays": None}

    def path(self, name):
        return os.path.join(self.dir, f"{name}.npy")

    def media_path(self, row):
        return self.dataset.media_path(self.clips[row])

    def create(self):
        """Make the files (sparse: no disk is used until entries are written)."""
        os.makedirs(self.dir, exist_ok=True)
        n = len(self.clips)
        specs = {"state": ((n,), np.int8), "files": ((n, 4), np.int64),
                 **{m: (self.shapes[m], np.float16) for m in self.modalities}}
        for name, (shape, dtype) in specs.items():
            if not os.path.exists(self.path(name)):
                tmp = self.path(name) + ".tmp"
                np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
                os.replace(tmp, self.path(name))

    def arrays(self):
        if self._arrays is None:
            names = ["state", "files", *self.modalities]
            self._arrays = {k: np.load(self.path(k), mmap_mode="r+") for k in names}
        return self._arrays

    def close(self):
        """Drop this process's maps of the files (they are opened again on the next read)."""
        self._arrays = None

    def complete(self):
        """Whether every row exists and was computed from the files as they are now."""
        names = ["state", "files", *self.modalities]
        return all(os.path.exists(self.path(k)) for k in names) and not self.stale()

    def stale(self):
        """Rows never computed, or computed from a file that has changed since."""
        a = self.arrays()
        now = np.array([clip_identity(self.media_path(k)) for k in range(len(self.clips))], dtype=np.int64)
        changed = (a["files"] != now).any(axis=1)
        return np.flatnonzero((a["state"] == TODO) | changed).tolist()

    @torch.no_grad()
    def build(self, net, device, ctx, batch_size, num_workers=0, rank=0, world=1, desc="cache"):
        """Compute the missing rows (`net.encode`'s outputs; the inputs themselves, and no
        `net`, for an inputs cache); each rank takes every world-th one. Returns how many rows
        were computed (by all ranks) once the cache is complete. Rows are flushed batch by
        batch, so an interrupted build keeps what it wrote."""
        if rank == 0:
            self.create()
        if dist.is_initialized():
            dist.barrier()
        todo = self.stale()
        if not todo:
            return 0
        mine = todo[rank::world]
        what = "decoded inputs" if self.inputs else "encoder outputs"
        T.print0(f"{desc}: computing the {what} of {len(todo)} of {len(self.clips)} clips into {self.dir}")
        a, errors = self.arrays(), dict(self.errors())
        encode = (lambda v, au: (v, au)) if self.inputs else net.encode
        was_training = net is not None and net.training
        if net is not None:
            net.eval()
        chunks = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]  # cache rows
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=[[self.first_record[k] for k in c] for c in chunks],
                                             num_workers=num_workers, collate_fn=data.collate)
        bar = T.progress(len(mine), desc)
        # the loader draws its worker seeds from the global generator: fork it, so that a run
        # trains the same whether or not it had to build its cache first
        with torch.random.fork_rng(devices=[]):
            for rows, batch in zip(chunks, loader):
                with ctx:
                    v, au = encode(None if batch["video"] is None else batch["video"].to(device),
                                   None if batch["audio"] is None else batch["audio"].to(device))
                read = set(batch["ids"])
                good = [k for k in rows if self.clips[k] in read]  # collate keeps the order
                bad = [k for k in rows if self.clips[k] not in read]
                for j, k in enumerate(good):
                    no_audio = batch["audio_mask"] is not None and not batch["audio_mask"][j]
                    if v is not None:
                        a["video"][k] = v[j].float().cpu().numpy()
                    if au is not None and not no_audio:
                        a["audio"][k] = au[j].float().cpu().numpy()
                    a["state"][k] = NO_AUDIO if no_audio else OK
                for k, (_, reason) in zip(bad, batch["skipped"]):
                    errors[self.clips[k]] = reason
                    a["state"][k] = UNREADABLE
                for k in rows:
                    a["files"][k] = clip_identity(self.media_path(k))
                for arr in a.values():
                    arr.flush()
                if bad:
                    T.write_json(os.path.join(self.dir, f"errors-{rank}.json"), errors)
                bar.update(len(rows))
        bar.close()
        self._errors = None  # read again: other ranks may have added theirs
        if net is not None:
            net.train(was_training)
        if dist.is_initialized():
            dist.barrier()
        return len(todo)

    def errors(self):
        """clip id -> why it could not be read, from every rank's build (read once)."""
        if self._errors is None:
            self._errors = {}
            for f in sorted(os.listdir(self.dir)):
                if f.startswith("errors-") and f.endswith(".json"):
                    with open(os.path.join(self.dir, f)) as fh:
                        self._errors.update(json.load(fh))
        return self._errors

    # -- the dataset ------------------------------------------------------------------------

    @property
    def records(self):
        return self.dataset.records

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)  # the flips' draws; nothing else random is left

    def __getitem__(self, i):
        a = self.arrays()
        rec, k = self.dataset.records[i], self.row[i]
        state = int(a["state"][k])
        if state == TODO:
            raise RuntimeError(f"{self.dir}: clip {rec['id']} was never computed; call build() first")
        if state == UNREADABLE:
            reason = self.errors().get(rec["id"], "unreadable when the cache was built")
            return {"id": rec["id"], "error": (self.media_path(k), reason)}
        item = {"id": rec["id"], "caption": rec[self.dataset.caption_field], "record": rec,
                "path": self.media_path(k)}
        if "video" in self.modalities:
            item["video"] = torch.from_numpy(np.array(a["video"][k]))  # a copy out of the map
            if self.flip and torch.rand((), generator=self.dataset.item_generator(i)) < 0.5:
                item["video"] = item["video"].flip(-1)  # (3, T, H, W): as data.preprocess_video
        if "audio" in self.modalities:
            item["audio_missing"] = state == NO_AUDIO
            if state == OK:
                item["audio"] = torch.from_numpy(np.array(a["audio"][k]))
        return item
