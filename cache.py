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

Layout: one store per (encoder weights or "inputs", preprocessing, modalities), holding an
entry per clip, whichever clip lists (splits, runs, filtered lists) asked for it:

    <root>/<key>/<shard>/video.npy   (n, Nv, Dv) fp16, memory-mapped   Nv = frames * (patches + 1)
                                     (inputs: (n, 3, frames, size, size))
    <root>/<key>/<shard>/audio.npy   (n, Na, Da) fp16, memory-mapped   (inputs: (n, 3, mel, length))
    <root>/<key>/<shard>/rows.jsonl  one line per finished row: the clip's media path, its row,
                                     ok / no audio / unreadable (and why), and the (size, mtime)
                                     of the clip and of its sidecar .wav when it was computed

`key` hashes everything an entry depends on except the media file itself. A shard is what one
process computed in one build: the clips that no shard held yet, or held from a file that has
changed since. So a list that gains a clip computes that clip alone, lists that share clips
share entries, and two ranks, or two runs, that build at once each write shards of their own
and never the same file. A row's line is written after its features are flushed, so a build
that is killed loses only rows without a line, and the next run computes exactly those.
"""

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import data
import training as T

VERSION = 4  # bump when the layout or what an entry means changes (4: entries per clip, not per list)
OK, NO_AUDIO, UNREADABLE = range(3)
STATES = ("ok", "no audio", "unreadable")  # how a row's line names them


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


def store_key(encoders, media, modalities):
    """The store's folder name: encoders' fingerprint, preprocessing config, modalities. Not
    the clip list: an entry is the same whichever list asked for it."""
    spec = json.dumps({"version": VERSION, "encoders": encoders, "media": asdict(media),
                       "modalities": modalities}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


class ShardWriter:
    """Writes one new shard of a store: `n` rows, filled in any order by `put`, each made
    findable by `commit` once its features are on disk. The arrays are created sparse, so
    rows never written take no disk."""

    def __init__(self, store, shapes, n, rank=0):
        # unique across ranks, runs and machines sharing the folder; names sort by creation
        self.dir = os.path.join(store, f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-r{rank}")
        os.makedirs(self.dir)
        self.arrays = {m: np.lib.format.open_memmap(os.path.join(self.dir, f"{m}.npy"), mode="w+",
                                                   dtype=np.float16, shape=(n, *shape))
                       for m, shape in shapes.items()}
        self.rows = open(os.path.join(self.dir, "rows.jsonl"), "a")
        self.pending = []

    def put(self, row, clip_path, state, files, video=None, audio=None, error=None):
        if video is not None:
            self.arrays["video"][row] = video
        if audio is not None:
            self.arrays["audio"][row] = audio
        line = {"path": clip_path, "row": row, "state": STATES[state], "files": list(files)}
        self.pending.append(dict(line, error=error) if error else line)

    def commit(self):
        """Flush the rows put since the last commit, then write their lines."""
        for a in self.arrays.values():
            a.flush()
        self.rows.writelines(json.dumps(line) + "\n" for line in self.pending)
        self.rows.flush()
        self.pending = []

    def close(self):
        self.commit()
        self.rows.close()
        self.arrays = None


def read_rows(store, wanted):
    """media path -> (shard, row, state, files, error): the newest line for each path in
    `wanted` (a set) over every shard of a store. A build killed mid-line leaves a broken last
    line, which is skipped: that row was never committed."""
    index = {}
    for shard in sorted(os.listdir(store)) if os.path.isdir(store) else []:
        path = os.path.join(store, shard, "rows.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            for text in f:
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if line["path"] in wanted:
                    index[line["path"]] = (shard, line["row"], STATES.index(line["state"]), tuple(line["files"]),
                                           line.get("error"))
    return index


_named_old_folders = set()


def old_layout_folders(root):
    """Folders of version 3 and before (one per clip list, with state.npy), which this
    version does not read."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, "state.npy")))


class FeatureCache(torch.utils.data.Dataset):
    """The encoder outputs of an evaluation-mode `data.AVCaptionDataset`, as a dataset whose
    items look like that dataset's but carry tokens instead of pixels: item["video"] is
    (Nv, Dv) and item["audio"] (Na, Da), in fp16, so `data.collate` stacks them unchanged and
    the model takes them as `video_tokens` / `audio_tokens`. Records that share a clip
    (several captions of one video) share its entry; so do datasets that share a clip."""

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
        self.root = root
        self.modalities = [m for m in ("video", "audio") if m in dataset.modalities]
        first = {}  # clip id -> its first record
        for i, r in enumerate(dataset.records):
            first.setdefault(r["id"], i)
        self.clips = list(first)
        self.first_record = list(first.values())
        row_of = {c: k for k, c in enumerate(self.clips)}
        self.row = [row_of[r["id"]] for r in dataset.records]  # record -> clip
        # an entry is found by its clip's media path, made absolute so that runs started from
        # other folders find it too (not resolved: a symlinked clip is an entry of its own)
        self.paths = [os.path.abspath(dataset.media_path(c)) for c in self.clips]
        self.dir = os.path.join(root, store_key(fingerprint, dataset.media, dataset.modalities))
        if inputs:  # what data.preprocess_video / preprocess_audio return, per clip
            self.shapes = {"video": (cfg.video.num_channels, cfg.video.num_frames, *cfg.video.image_size),
                           "audio": (cfg.audio.num_channels, *cfg.audio.image_size)}
        else:
            self.shapes = {"video": (cfg.video.num_frames * cfg.video.tokens_per_frame, cfg.video.width),
                           "audio": (cfg.audio.tokens_per_frame, cfg.audio.width)}
        self.shapes = {m: self.shapes[m] for m in self.modalities}
        self._entries = None  # clip -> (shard, row, state, files, error), read lazily
        self._maps = {}  # shard -> {modality: memmap}, opened lazily, once per process

    def __getstate__(self):
        # a loader worker (started by data.worker_context, so it receives this object pickled)
        # maps the files itself instead of receiving a pickled copy of every array
        return {**self.__dict__, "_maps": {}}

    def media_path(self, k):
        return self.dataset.media_path(self.clips[k])

    def entries(self):
        """Each clip's entry, or None, as the store's lines say (read once; `build` reads them
        again)."""
        if self._entries is None:
            index = read_rows(self.dir, set(self.paths))
            self._entries = [index.get(p) for p in self.paths]
        return self._entries

    def close(self):
        """Drop this process's maps and index (read again on the next access)."""
        self._maps, self._entries = {}, None

    def complete(self):
        """Whether every clip has an entry computed from its files as they are now."""
        return not self.stale()

    def stale(self):
        """Clips with no entry, or one computed from files that have changed since."""
        return [k for k, e in enumerate(self.entries())
                if e is None or e[3] != clip_identity(self.media_path(k))]

    @torch.no_grad()
    def build(self, net, device, ctx, batch_size, num_workers=0, rank=0, world=1, desc="cache"):
        """Compute the missing entries (`net.encode`'s outputs; the inputs themselves, and no
        `net`, for an inputs cache); each rank takes every world-th one into a shard of its
        own. Returns how many were computed (by all ranks) once the cache is complete. Rows are
        committed batch by batch, so an interrupted build keeps what it wrote."""
        self.close()
        todo = self.stale()  # every rank reads the store before any rank writes to it
        if dist.is_initialized():
            dist.barrier()
        if not todo:
            return 0
        old = [d for d in old_layout_folders(self.root) if d not in _named_old_folders]
        _named_old_folders.update(old)  # named once a run, not once a split
        if old:
            T.print0(f"{desc}: {len(old)} folder(s) in {self.root} hold features in the layout of an earlier "
                     "version (one folder per clip list); they are not read, and their clips are computed "
                     "again, once, into the per-clip store (delete them to free the space): "
                     + ", ".join(os.path.basename(d) for d in old))
        mine = todo[rank::world]
        what = "decoded inputs" if self.inputs else "encoder outputs"
        T.print0(f"{desc}: computing the {what} of {len(todo)} of {len(self.clips)} clips into {self.dir}")
        encode = (lambda v, au: (v, au)) if self.inputs else net.encode
        was_training = net is not None and net.training
        if net is not None:
            net.eval()
        chunks = [list(range(k, min(k + batch_size, len(mine)))) for k in range(0, len(mine), batch_size)]
        loader = data.loader(self.dataset, batch_sampler=[[self.first_record[mine[j]] for j in c] for c in chunks],
                             num_workers=num_workers)
        writer = ShardWriter(self.dir, self.shapes, len(mine), rank) if mine else None
        bar = T.progress(len(mine), desc)
        # the loader draws its worker seeds from the global generator: fork it, so that a run
        # trains the same whether or not it had to build its cache first
        with torch.random.fork_rng(devices=[]):
            for rows, batch in zip(chunks, loader):  # rows: this shard's rows, mine[row]: the clip
                with ctx:
                    v, au = encode(None if batch["video"] is None else batch["video"].to(device),
                                   None if batch["audio"] is None else batch["audio"].to(device))
                read = {c: j for j, c in enumerate(batch["ids"])}  # collate keeps the order, drops the bad
                reasons = iter(reason for _, reason in batch["skipped"])
                for row in rows:
                    k = mine[row]
                    files, j = clip_identity(self.media_path(k)), read.get(self.clips[k])
                    if j is None:
                        writer.put(row, self.paths[k], UNREADABLE, files, error=next(reasons))
                        continue
                    no_audio = batch["audio_mask"] is not None and not batch["audio_mask"][j]
                    writer.put(row, self.paths[k], NO_AUDIO if no_audio else OK, files,
                               video=None if v is None else v[j].float().cpu().numpy(),
                               audio=None if au is None or no_audio else au[j].float().cpu().numpy())
                writer.commit()
                bar.update(len(rows))
        bar.close()
        if writer is not None:
            writer.close()
        if net is not None:
            net.train(was_training)
        if dist.is_initialized():
            dist.barrier()
        self.close()  # the other ranks' shards are read on the next access
        return len(todo)

    def errors(self):
        """clip id -> why it could not be read, as the build that tried it wrote."""
        return {self.clips[k]: e[4] for k, e in enumerate(self.entries()) if e is not None and e[2] == UNREADABLE}

    def read(self, k, modality):
        """Clip k's stored array for one modality, copied out of its shard's map."""
        shard, row = self.entries()[k][:2]
        if shard not in self._maps:
            self._maps[shard] = {m: np.load(os.path.join(self.dir, shard, f"{m}.npy"), mmap_mode="r")
                                 for m in self.modalities}
        return torch.from_numpy(np.array(self._maps[shard][modality][row]))

    # -- the dataset ------------------------------------------------------------------------

    @property
    def records(self):
        return self.dataset.records

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)  # the flips' draws; nothing else random is left

    def __getitem__(self, i):
        rec, k = self.dataset.records[i], self.row[i]
        entry = self.entries()[k]
        if entry is None:
            raise RuntimeError(f"{self.dir}: clip {rec['id']} was never computed; call build() first")
        state = entry[2]
        if state == UNREADABLE:
            return {"id": rec["id"], "error": (self.media_path(k), entry[4] or "unreadable when the cache was built")}
        item = {"id": rec["id"], "caption": rec[self.dataset.caption_field], "record": rec,
                "path": self.media_path(k)}
        if "video" in self.modalities:
            item["video"] = self.read(k, "video")
            if self.flip and torch.rand((), generator=self.dataset.item_generator(i)) < 0.5:
                item["video"] = item["video"].flip(-1)  # (3, T, H, W): as data.preprocess_video
        if "audio" in self.modalities:
            item["audio_missing"] = state == NO_AUDIO
            if state == OK:
                item["audio"] = self.read(k, "audio")
        return item
