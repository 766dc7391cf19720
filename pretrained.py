"""Loading the official checkpoints into `model.UniQ4Cap` by explicit name mapping.

Each loader reads one file into a plain state dict (`read_state_dict`); a `map_*` function
renames and reshapes it into this model's names and hands it to `assign`, which refuses to
leave anything to chance: a source key that maps nowhere, a parameter the file does not
cover (unless named as provided elsewhere), or a shape that differs is an error naming the
key. The `map_*` functions take the state dict itself, so the tests run them on the `meta`
device at the full preset's shapes. `load_pretrained` is the one entry point the scripts use;
`weights_file` turns any name a user would give (a file, a folder, a URL, a Hugging Face repo
id) into a local file.

The files and their layouts, each stated again where it is mapped:
  - LanguageBind's towers, `pytorch_model.bin` of the Hugging Face repos
    `LanguageBind/LanguageBind_Video_FT` and `LanguageBind_Audio_FT`: HF CLIP names under
    `vision_model.` (LanguageBind's `modeling_languagebind` adds `temporal_*` to each video
    layer), plus the text tower under `text_model.` (`map_text`), which classification reads;
  - the authors' pre-aligned encoders `video.pth` / `audio.pth` (UniQ4Cap's release): the same
    names without the prefix, the video patch embedding as a Conv3d with one class vector per
    frame (their `clip_type: "vl_new"`);
  - `bert-base-cased` (`google-bert/bert-base-cased`): HF `BertForPreTraining` names;
  - BLIP-2's `blip2_pretrained.pth` (LAVIS, `lavis/models/blip2_models/blip2_qformer.py`):
    {"model": state dict} with `Qformer.bert.*`, `Qformer.cls.*`, `query_tokens` and the
    retrieval heads;
  - the authors' stage-2 `checkpoint_N.pth` (LAVIS's runner format): {"model", "optimizer",
    "config", "scaler", "epoch"}, the Q-Former side of UniQ4Cap under our module names.
"""

import math
import os
import re
import sys
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from safetensors.torch import load_file

from model import TextTransformer, UniQ4Cap, VisionTransformer, init_bert_weights


class CheckpointError(KeyError, ValueError):
    """A checkpoint that cannot be loaded: unreadable, or keys and shapes that do not fit this
    model. The message is one line naming the file. (A KeyError for the key-level problems and
    a ValueError for the rest, with a plain message: KeyError's own str() would quote it.)"""

    __str__ = Exception.__str__


# HF's BERT and CLIP save their position index tables (an arange) as persistent buffers;
# this model computes positions on the fly, so such a key carries nothing to load.
RECOMPUTED_BUFFERS = ("position_ids",)


def read_state_dict(path):
    """A .safetensors file or a torch pickle, loaded with weights_only=True. A missing file
    is a FileNotFoundError; a truncated or corrupt one a CheckpointError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(reason) > 120:  # torch's messages go on about weights_only; the first sentence says it
            reason = reason.split(". ")[0]
        raise CheckpointError(f"{path}: cannot read this checkpoint (truncated, corrupt or not a "
                              f"PyTorch/safetensors file: {reason})") from e


def _left_parts(left, fresh):
    """Parameter names a file does not cover -> one phrase per reason, naming the modules
    up to the matching `fresh` pattern with layer numbers folded:
    'bert.encoder.layer.{0,2}.crossattention (new: ...)'."""
    parts = {}  # reason -> {module path with '*' for the layer number: layer numbers}
    for k in left:
        f = next(f for f in fresh if f in k)
        path = k[:k.index(f) + len(f)].strip(".")
        m = re.search(r"\.(\d+)\.", path)
        key = path if m is None else path[:m.start()] + ".*." + path[m.end():]
        parts.setdefault(fresh[f], {}).setdefault(key, set()).update([int(m.group(1))] if m else [])
    phrases = []
    for reason, paths in parts.items():
        names = [p.replace("*", str(*n) if len(n) == 1 else "{" + ",".join(map(str, sorted(n))) + "}")
                 for p, n in paths.items()]
        phrases.append(f"{', '.join(names)} ({reason})")
    return "; ".join(phrases)


def assign(module, tensors, source, fresh=None):
    """Copy `tensors` (our names -> tensors) into `module`'s parameters. Every parameter must
    be covered except those whose name contains one of the `fresh` patterns: the parts this
    source does not provide by design, a dict pattern -> where they come from instead (or
    why they stay as they are), which stderr reports. Keys of RECOMPUTED_BUFFERS are dropped.
    Returns the names assigned."""
    fresh = fresh or {}
    tensors = {k: t for k, t in tensors.items() if k.rsplit(".", 1)[-1] not in RECOMPUTED_BUFFERS}
    own = dict(module.named_parameters())  # tied weights appear once
    for k, t in tensors.items():
        if k not in own:
            raise CheckpointError(f"{source}: '{k}' has no place in {type(module).__name__}")
        if tuple(t.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{source}: shape mismatch for '{k}': expected "
                                  f"{tuple(own[k].shape)}, found {tuple(t.shape)}")
    missing = [k for k in own if k not in tensors and not any(f in k for f in fresh)]
    if missing:
        raise CheckpointError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing in all)")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    left = [k for k in own if k not in tensors]
    if left:  # said aloud, never silent: which parts this file leaves to another source
        print(f"{source}: {len(tensors)} tensors loaded into {type(module).__name__}; not from this "
              f"file: {_left_parts(left, fresh)}", file=sys.stderr)
    return sorted(tensors)


def _fit_positions(pos, grid, name):
    """Position embedding (1+h*w, D) of a square grid -> (1 + grid[0]*grid[1], D), bicubic with
    antialias on the patch positions, class position kept (image CLIP -> audio grid)."""
    n = pos.size(0) - 1
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"{name}: cannot interpolate {n} positions, not a square grid")
    patches = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", antialias=True,
                            align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # -> (gh*gw, D)
    return torch.cat([pos[:1], patches.to(pos.dtype)], dim=0)


ENCODER_OPTIONAL = {"visual_projection.weight": "unused by the captioner: stays as initialised"}


def map_encoder(encoder: VisionTransformer, sd, source):
    """One CLIP vision tower from a state dict with the authors' names (no prefix). Handles
    the differences between the official files by shape: a Conv2d patch weight meets our
    Conv3d (unsqueeze the time axis: tube size 1 is the same function), one class vector meets
    one per frame (repeat it), an image checkpoint's 257 positions meet the audio grid
    (interpolate), and a temporal embedding for another frame count (interpolate in time).
    A file already in the Conv3d / per-frame form (the authors' video.pth, and LanguageBind
    files saved after expanding to 3-D) loads as it is. `visual_projection.weight` is
    optional: stage 2 never reads it."""
    cfg = encoder.cfg
    out = {}
    for k, t in sd.items():
        if k == "embeddings.patch_embedding.weight" and t.dim() == 4 and cfg.temporal:
            t = t.unsqueeze(2)  # (D, 3, p, p) -> (D, 3, 1, p, p)
        elif k == "embeddings.class_embedding" and cfg.temporal and t.dim() == 1:
            t = t[None].repeat(cfg.num_frames, 1)  # (D,) -> (T, D)
        elif k == "embeddings.position_embedding.weight" and t.size(0) != cfg.tokens_per_frame:
            t = _fit_positions(t, cfg.grid, f"{source}: '{k}'")
        elif k.endswith("temporal_embedding") and t.size(1) != cfg.num_frames:
            t = F.interpolate(t.float().transpose(1, 2), size=cfg.num_frames, mode="linear",
                              align_corners=False).transpose(1, 2).to(t.dtype)  # (1, T', D) -> (1, T, D)
        out[k] = t
    return assign(encoder, out, source, fresh=ENCODER_OPTIONAL)


def map_languagebind(encoder: VisionTransformer, sd, source="pytorch_model.bin"):
    """LanguageBind's HF checkpoint, `pytorch_model.bin` of `LanguageBind_Video_FT` or
    `LanguageBind_Audio_FT`: `vision_model.*` and `visual_projection.weight` are read; the text
    tower (`text_model.*`, `text_projection.weight`, `logit_scale`) is map_text's."""
    vision = {}
    for k, t in sd.items():
        if k.startswith("vision_model."):
            vision[k[len("vision_model."):]] = t
        elif k == "visual_projection.weight":
            vision[k] = t
        elif not (k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale")):
            raise CheckpointError(f"{source}: unexpected key '{k}'")
    return map_encoder(encoder, vision, source)


def map_text(text: TextTransformer, sd, source="pytorch_model.bin"):
    """LanguageBind's text tower, from the same `pytorch_model.bin` as its vision tower (every
    LanguageBind file carries the frozen text tower it was trained against): transformers'
    `CLIPTextModelWithProjection` names, `text_model.embeddings.{token,position}_embedding`,
    `text_model.encoder.layers.N.*` (the vision layers' names), `text_model.final_layer_norm`
    and `text_projection.weight`. The vision tower's keys are skipped. Returns `logit_scale`,
    the log inverse temperature the towers were bound with (None if the file has none)."""
    out, logit_scale = {}, None
    for k, t in sd.items():
        if k.startswith("text_model."):
            out[k[len("text_model."):]] = t
        elif k == "text_projection.weight":
            out[k] = t
        elif k == "logit_scale":
            logit_scale = t
        elif not (k.startswith("vision_model.") or k == "visual_projection.weight"):
            raise CheckpointError(f"{source}: unexpected key '{k}'")
    if not out:
        raise CheckpointError(f"{source}: no text tower in this file (LanguageBind's files carry one under "
                              f"'text_model.')")
    assign(text, out, source)
    return logit_scale


def load_text(text: TextTransformer, name):
    """LanguageBind's text tower from any of its files (`name` as for `weights_file`)."""
    path = weights_file(name)
    return map_text(text, read_state_dict(path), path)


def load_encoder(encoder: VisionTransformer, name):
    """One tower from either format, told apart by LanguageBind's `vision_model.` prefix:
    LanguageBind's HF `pytorch_model.bin` or the authors' (and train_align.py's) `video.pth` /
    `audio.pth`. `name` as for `weights_file`."""
    path = weights_file(name)
    sd = read_state_dict(path)
    if isinstance(sd.get("model"), dict):  # a whole state dict nested in a checkpoint
        raise CheckpointError(f"{path}: a training or stage-2 checkpoint (its weights under 'model'), not an "
                              f"encoder's weights: give the encoder file (LanguageBind's, or train_align.py's "
                              f"video.pth / audio.pth)")
    if any(k.startswith("vision_model.") for k in sd):
        return map_languagebind(encoder, sd, path)
    return map_encoder(encoder, sd, path)


def _bert_name(k):
    """bert-base-cased name -> ours (inside `Qformer`), or None for keys we do not use."""
    k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if (k.startswith(("bert.pooler.", "cls.seq_relationship."))
            or k in ("bert.embeddings.token_type_embeddings.weight",
                     "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")):
        # unused by a captioner; the decoder weight is tied to the word embeddings and
        # decoder.bias is an alias of predictions.bias
        return None
    if k.startswith(("bert.embeddings.", "bert.encoder.", "cls.predictions.")):
        return k
    raise CheckpointError(f"unexpected key '{k}'")


BERT_FRESH = {".crossattention.": "new in BERT: from BLIP-2's checkpoint, else trained from scratch"}


def map_bert(model: UniQ4Cap, sd, source="bert-base-cased"):
    """BERT into the Q-Former: embeddings, self-attention, text FFN and LM head. Reads
    bert-base-cased's files (BertForPreTraining: `bert.*` and `cls.*`), and also a bare
    BertModel without the `bert.` prefix (`BertModel.save_pretrained`, sentence-transformers)
    and a file without the MLM head: then the head's transform and output bias start from
    BERT's initialisation (the decoder stays tied to the loaded word embeddings), said on
    stderr. The vocabulary grows by one row for [DEC], initialised like BERT's (normal,
    std 0.02; output bias 0). The query FFN starts as a copy of the text FFN. The
    cross-attention is not BERT's: BLIP-2's checkpoint or training provides it."""
    q = model.cfg.qformer
    if not any(k.startswith(("bert.", "cls.")) for k in sd):
        sd = {"bert." + k: t for k, t in sd.items()}  # a bare BertModel: embeddings.*, encoder.*, pooler.*
    out = {}
    for k, t in sd.items():
        try:
            ours = _bert_name(k)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if ours is None:
            continue
        if ours in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias") and t.size(0) == q.vocab_size - 1:
            extra = torch.zeros_like(t[:1])  # the [DEC] row
            if t.dim() == 2:
                extra.normal_(std=0.02)
            t = torch.cat([t, extra], dim=0)
        out[ours] = t
        if re.match(r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.", ours):
            # layer.N.intermediate.* -> layer.N.intermediate_query.*, same for output
            out[re.sub(r"\.(intermediate|output)\.", r".\1_query.", ours, count=1)] = t
    fresh = dict(BERT_FRESH)
    no_head = not any(k.startswith("cls.predictions.") for k in out)
    if no_head:
        fresh["cls.predictions."] = "no MLM head in this file: BERT's initialisation, decoder tied to the word embeddings"
    names = assign(model.Qformer, out, source, fresh=fresh)
    if no_head:  # whatever an earlier load left there, the head starts as BERT's would
        head = model.Qformer.cls.predictions
        head.transform.apply(init_bert_weights)
        with torch.no_grad():
            head.bias.zero_()
    return names


def load_bert(model: UniQ4Cap, name):
    """BERT's `model.safetensors` or `pytorch_model.bin` (old `gamma`/`beta` or new
    `weight`/`bias` LayerNorm names): the file, its folder, or a repo id such as
    `google-bert/bert-base-cased` (see `weights_file`)."""
    path = weights_file(name)
    return map_bert(model, read_state_dict(path), path)


def map_blip2(model: UniQ4Cap, sd, source="blip2_pretrained.pth", query_noise=0.0):
    """BLIP-2's pretrained Q-Former into ours, as the authors initialised stage 2: every key
    containing `embedding` or `predictions` is skipped (word/position embeddings, the
    position_ids buffer and the LM head come from bert-base-cased, whose cased vocabulary
    differs from BLIP-2's uncased one), and the 32 query tokens are tiled to our count.
    `query_noise` adds Gaussian noise of that std to the tiled queries so twins do not start
    identical. BLIP-2's `ln_vision` (1408 wide, for its EVA ViT) has no counterpart here.
    Provides: the Q-Former's encoder layers (cross-attention included), query_tokens and the
    optional heads."""
    Q = model.cfg.qformer.num_query_tokens
    out = {}
    for k, t in sd.items():
        if "embedding" in k or "predictions" in k or k.startswith(("ln_vision.", "visual_encoder.")):
            continue
        if k == "query_tokens":
            if Q % t.size(1):
                raise CheckpointError(f"{source}: cannot tile {t.size(1)} query tokens to {Q}")
            t = t.repeat(1, Q // t.size(1), 1)  # (1, 32, C) -> (1, 64, C): [q0..q31, q0..q31]
            if query_noise > 0:
                t = t + query_noise * torch.randn_like(t)
        out[k] = t
    encoders, new = "the encoder files", "new in UniQ4Cap: trained in stage 2"
    bert = "from bert-base-cased: BLIP-2's vocabulary is uncased"
    return assign(model, out, source, fresh={
        "video_encoder.": encoders, "audio_encoder.": encoders, "ln_video.": new, "ln_audio.": new,
        "video_project.": new, "audio_project.": new, "Qformer.bert.embeddings.": bert, "Qformer.cls.": bert})


def load_blip2(model: UniQ4Cap, name, query_noise=0.0):
    """BLIP-2's `blip2_pretrained.pth`, {"model": state_dict} (186M parameters): the file,
    its URL, or the short name `blip2` for that URL (see `weights_file`)."""
    path = weights_file(name)
    ckpt = read_state_dict(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry: not BLIP-2's blip2_pretrained.pth")
    return map_blip2(model, ckpt["model"], path, query_noise)


def stage2_state_dict(model: UniQ4Cap):
    """What a stage-2 checkpoint holds: everything but the frozen encoders (the authors'
    `checkpoint_N.pth` layout; `train_caption.py` writes the same)."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("video_encoder.", "audio_encoder."))}


def map_stage2(model: UniQ4Cap, sd, source="checkpoint.pth"):
    """A stage-2 state dict: Q-Former, query tokens, ln_video/ln_audio, the projections and
    the optional heads, all required; the encoders are loaded separately. The authors' file
    also holds the frozen parts' position_ids buffers (their trainer drops only frozen
    *parameters*): dropped, see RECOMPUTED_BUFFERS."""
    aliases = ("Qformer.cls.predictions.decoder.weight",  # tied to the word embeddings
               "Qformer.cls.predictions.decoder.bias")  # alias of predictions.bias
    out = {k: t for k, t in sd.items() if k not in aliases}
    return assign(model, out, source, fresh={"video_encoder.": "the encoder files",
                                             "audio_encoder.": "the encoder files"})


def load_stage2(model: UniQ4Cap, path):
    """The authors' stage-2 `checkpoint_N.pth` ({"model", "optimizer", "config", "scaler",
    "epoch"}, "config" being their run configuration), or one written by train_caption.py
    (the same "model", plus our config and tokenizer)."""
    return map_stage2(model, stage2_model(read_state_dict(path), path), path)


def stage2_model(ckpt, path):
    """The "model" state dict of a stage-2 checkpoint already read from `path`."""
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry: not a stage-2 checkpoint")
    return ckpt["model"]


# Where a name that is not a local path is looked up. The Hugging Face repos resolve through
# huggingface_hub (its standard cache, HF_HOME / HF_HUB_CACHE, and HF_HUB_OFFLINE honoured);
# BLIP-2's file is a plain URL, fetched once into torch.hub's cache (TORCH_HOME).
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in this order of preference
URLS = {"blip2": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained.pth"}


def _is_repo_id(name):
    """`org/name`, or a bare legacy name such as `bert-base-cased` (the Hub still resolves
    those). Asked only of names that are no local path; a mistyped one like
    `out/align/video.pth`, `/data/bert` or `video.pth` (a path separator beyond org/name, or
    a file name's ending) is reported as missing, not looked up on the Hub."""
    return (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None
            and not name.lower().endswith((".pth", ".pt", ".bin", ".safetensors", ".json", ".txt")))


def _hf_file(repo, filenames):
    """The first of `filenames` that repo `repo` has, as a path in the HF cache (downloaded
    once unless HF_HUB_OFFLINE is set). None when the repo has none of them."""
    for f in filenames:
        try:
            return hf_hub_download(repo, f)
        except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: caught first)
            if constants.HF_HUB_OFFLINE:  # not in the cache: the next may be
                continue
            error = e  # online, but the Hub could not be reached and the cache lacks it
        except EntryNotFoundError:  # the repo has no such file: try the next
            continue
        except (HfHubHTTPError, HFValidationError, OSError) as e:
            error = e
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FileNotFoundError(f"{repo}: no such file or folder here, and the Hugging Face Hub "
                                f"could not provide {f}: {reason}")
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{repo}: no such file or folder here, and HF_HUB_OFFLINE is set while "
                                f"the Hugging Face cache ({constants.HF_HUB_CACHE}) has no "
                                f"{' or '.join(filenames)} of it")
    return None


def _url_file(url):
    """A URL's file in torch.hub's cache, `<torch.hub.get_dir()>/checkpoints/<file name>` (where
    torch.hub.load_state_dict_from_url keeps it too), downloaded the first time."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading {url} to {path}", file=sys.stderr)
        try:
            torch.hub.download_url_to_file(url, path)
        except OSError as e:  # URLError and HTTPError are OSErrors
            raise FileNotFoundError(f"{url}: cannot download it: {e}") from None
    return path


def _not_found(name):
    return FileNotFoundError(f"{name}: no such file or folder, and not a URL or a Hugging Face repo id")


def weights_file(name):
    """Any way of naming a checkpoint -> a local weights file:
      - an existing file: itself;
      - a folder: its model.safetensors, else its pytorch_model.bin (an HF model folder);
      - a URL (http, https, file) or a name in URLS (`blip2`): torch.hub's cached copy;
      - a Hugging Face repo id (`LanguageBind/LanguageBind_Video_FT`,
        `google-bert/bert-base-cased`, or a legacy bare name such as `bert-base-cased`)
        that is no local path and no file name: model.safetensors, else pytorch_model.bin, through
        huggingface_hub's cache (only that file is fetched).
    Anything else is a FileNotFoundError with one line saying what `name` is not."""
    if os.path.isfile(name):
        return name
    if os.path.isdir(name):
        for f in HF_WEIGHTS:
            if os.path.isfile(os.path.join(name, f)):
                return os.path.join(name, f)
        raise FileNotFoundError(f"{name}: a folder without {' or '.join(HF_WEIGHTS)}")
    url = URLS.get(name, name)
    if url.startswith(("http://", "https://", "file://")):
        return _url_file(url)
    if _is_repo_id(name):
        path = _hf_file(name, HF_WEIGHTS)
        if path is None:
            raise FileNotFoundError(f"{name}: the Hugging Face repo has no {' or '.join(HF_WEIGHTS)}")
        return path
    raise _not_found(name)


def tokenizer_folder(name, files, optional=()):
    """A folder holding a tokenizer's `files` (and its `optional` ones when it has them): the
    folder itself, the folder of a weights file, or a Hugging Face repo id's snapshot in the
    HF cache (the tokenizer files only are fetched)."""
    if os.path.isdir(name):
        return name
    if os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name))
    if not _is_repo_id(name):
        raise _not_found(name)
    paths = [_hf_file(name, [f]) for f in files]
    if None in paths:
        raise FileNotFoundError(f"{name}: the Hugging Face repo has no {files[paths.index(None)]}")
    for f in optional:  # fetched into the same snapshot folder
        try:
            _hf_file(name, [f])
        except FileNotFoundError:  # neither cached nor reachable: the tokenizer says what it assumes
            pass
    return os.path.dirname(paths[0])


def bert_folder(name):
    """BERT's vocab.txt, and its tokenizer_config.json when there is one."""
    return tokenizer_folder(name, ["vocab.txt"], ["tokenizer_config.json"])


def load_pretrained(model: UniQ4Cap, video=None, audio=None, bert=None, blip2=None,
                    stage2=None, query_noise=0.0):
    """The one entry point for the official files: load whichever are given, in the order
    the authors built stage 2: encoders (LanguageBind's HF file or the authors' video.pth /
    audio.pth, told apart by the `vision_model.` prefix), then BERT, then BLIP-2's Q-Former,
    then a stage-2 checkpoint (which replaces everything but the encoders). Each may be a
    file, a folder, a URL, a short name or a Hugging Face repo id (see `weights_file`):

        load_pretrained(model, video="LanguageBind/LanguageBind_Video_FT",
                        audio="LanguageBind/LanguageBind_Audio_FT",
                        bert="google-bert/bert-base-cased", blip2="blip2")"""
    for name, encoder in ((video, model.video_encoder), (audio, model.audio_encoder)):
        if name is not None:
            load_encoder(encoder, name)
    if bert is not None:
        load_bert(model, bert)
    if blip2 is not None:
        load_blip2(model, blip2, query_noise)
    if stage2 is not None:
        load_stage2(model, stage2)
    return model
