"""Classification from the unified queries, the paper's "downstream classification":

  --zero-shot  through the contrastive heads, as LanguageBind classifies: each class name is
               put in every prompt template, a class's text feature is the mean of its
               templates' (unit-length) features, made unit length again, and a clip's logit
               for a class is 100 x the cosine of its best query with it;
  --probe      a linear probe: logistic regression on the pooled query feature (the mean of the
               queries' final outputs), one head per label, its L2 weight chosen on the
               validation split from a grid, reported on the test split;
  --finetune   the Q-Former side (memory projections, queries, Q-Former) and a linear head on
               the pooled query feature, trained together on the training split from the
               frozen towers' outputs (computed once), the epoch chosen on validation.

Labels come from a field of the annotation records: a string is one label (reported as top-1
and top-5 accuracy), a list of strings several (reported as mAP, as for AudioSet); a dotted
name reaches into a dict ("attributes.colour" on the embedded data). --modalities chooses the
memory the queries read, so one trained model gives the video-only, audio-only and joint rows.

    python classify.py --ckpt out/retrieval/best.pth --label attributes.colour --label attributes.background --probe
    python classify.py --ckpt out/retrieval/best.pth --label attributes.colour --zero-shot
    python classify.py --ckpt out/retrieval/best.pth --label attributes.colour --probe --random-qformer  # the floor
    python classify.py --ckpt out/retrieval/best.pth --label attributes.background --finetune
"""

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model as M
import retrieve
import training as T

TEMPLATES = ["{}", "a video of {}.", "the sound of {}."]
L2_GRID = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", action="append", required=True,
                   help="annotation field holding the labels, dotted into dicts (repeat for several)")
    p.add_argument("--zero-shot", action="store_true", help="classify through ITC with prompt templates")
    p.add_argument("--probe", action="store_true", help="fit a linear probe on the training split")
    p.add_argument("--templates", nargs="+", default=TEMPLATES,
                   help="zero-shot prompt templates, '{}' standing for the class name (default: %(default)s)")
    p.add_argument("--modalities", default="video+audio", choices=["video+audio", "video", "audio"],
                   help="the memory the queries read")
    p.add_argument("--finetune", action="store_true",
                   help="fine-tune the Q-Former side with a linear head, one model per --label")
    p.add_argument("--finetune-epochs", type=int, default=10, help="epochs of --finetune (the best on val is reported)")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="AdamW learning rate of --finetune")
    p.add_argument("--seed", type=int, default=0, help="seed of --finetune's head and batch order")
    p.add_argument("--random-qformer", action="store_true",
                   help="the floor: the checkpoint's frozen encoders under a Q-Former side (queries, projections, "
                        "heads) as initialised and never trained")
    p.add_argument("--out", default=None, help="the results as JSON (default: printed)")
    p.add_argument("--batch-size", type=int, default=32, help="clips encoded together")
    T.add_checkpoint_args(p)
    T.add_data_args(p)
    args = p.parse_args(argv)
    if not (args.zero_shot or args.probe or args.finetune):
        p.error("give --zero-shot, --probe, --finetune, or several")
    if args.finetune_epochs < 1:
        p.error("--finetune-epochs must be at least 1")
    if any("{}" not in t for t in args.templates):
        p.error("every --templates entry needs '{}' where the class name goes")
    return args


def labels_of(record, field):
    """The record's labels under a dotted field name, as a list of strings."""
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise data.DataError(f"record {record.get('id')!r} has no label field '{field}'")
        value = value[part]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def untrained_reader(net, seed=0):
    """`net`'s frozen towers under everything else freshly initialised (seed `seed`): what the
    features of a clip are worth before any stage-2 training, the floor a probe must beat."""
    torch.manual_seed(seed)
    fresh = M.UniQ4Cap(net.cfg, encoders=False)
    fresh.video_encoder, fresh.audio_encoder = net.video_encoder, net.audio_encoder
    return fresh.eval().to(next(net.parameters()).device)


def split_features(net, dataset, args, ctx):
    """The readable clips' pooled query features (N, C) and unit-length clip features (N, Q, E),
    and their records (retrieve.gallery)."""
    clip, pooled, _, records, skipped = retrieve.gallery(net, dataset, args.device, ctx, args.batch_size, False,
                                                         T.loader_workers(args, False, args.device), desc="features")
    for path, reason in skipped:
        print(f"skipped, unreadable: {path}: {reason}", file=sys.stderr)
    if not records:
        raise data.UnreadableClips("no readable clip to classify")
    return pooled, clip, records


def one_hot(records, field, classes):
    """(N, K) 0/1 targets."""
    out = torch.zeros(len(records), len(classes))
    for i, r in enumerate(records):
        for label in labels_of(r, field):
            if label in classes:
                out[i, classes.index(label)] = 1.0
    return out


def scores(logits, targets, multi_label):
    """Top-1 and top-5 accuracy (single-label), or mAP (multi-label), as fractions."""
    if not multi_label:
        truth = targets.argmax(dim=1)
        top = logits.topk(min(5, logits.size(1)), dim=1).indices
        return {"top-1": (top[:, 0] == truth).float().mean().item(),
                "top-5": (top == truth[:, None]).any(dim=1).float().mean().item()}
    aps = []
    for k in range(targets.size(1)):
        if targets[:, k].sum() == 0:
            continue  # a class no clip has: no precision to average
        order = logits[:, k].argsort(descending=True)
        hits = targets[order, k]
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
        aps.append((precision * hits).sum().item() / hits.sum().item())
    return {"mAP": sum(aps) / len(aps)}


def zero_shot(net, tokenizer, clip_feats, classes, templates, device, ctx):
    """(N, K) logits: 100 x the best query's cosine with each class's template-averaged feature."""
    weights = []
    for name in classes:
        feats = retrieve.text_features(net, tokenizer, [t.format(name) for t in templates], device, ctx)
        weights.append(F.normalize(feats.mean(dim=0), dim=-1))
    return 100 * retrieve.itc_similarity(torch.stack(weights), clip_feats).t()


def linear_probe(train, val, test, epochs=200):
    """train / val / test: (features (N, C), targets (N, K)). Logistic regression (softmax, or
    one sigmoid per class for several labels) on standardised features, full-batch L-BFGS, at
    each L2 weight of L2_GRID; the one with the best validation score is reported on test."""
    multi_label = bool((train[1].sum(dim=1) > 1).any())
    mean, std = train[0].mean(dim=0), train[0].std(dim=0).clamp_min(1e-6)
    norm = [((x - mean) / std, y) for x, y in (train, val, test)]
    best = None
    for l2 in L2_GRID:
        torch.manual_seed(0)
        head = torch.nn.Linear(norm[0][0].size(1), norm[0][1].size(1))
        opt = torch.optim.LBFGS(head.parameters(), max_iter=epochs, line_search_fn="strong_wolfe")
        x, y = norm[0]

        def closure():
            opt.zero_grad()
            logits = head(x)
            loss = (F.binary_cross_entropy_with_logits(logits, y) if multi_label
                    else F.cross_entropy(logits, y.argmax(dim=1)))
            loss = loss + l2 * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val_score = scores(head(norm[1][0]), norm[1][1], multi_label)
            key = next(iter(val_score.values()))
            if best is None or key > best[0]:
                best = (key, l2, scores(head(norm[2][0]), norm[2][1], multi_label))
    return {"l2": best[1], **best[2]}


@torch.no_grad()
def tower_outputs(net, dataset, args, ctx):
    """The frozen towers' outputs of every readable clip, computed once and held in memory
    (fp16) for fine-tuning to read every epoch: ({"video_tokens", "audio_tokens", "video_mask",
    "audio_mask"}: (N, ...) tensors or None, records)."""
    loader = data.loader(dataset, batch_size=args.batch_size, num_workers=T.loader_workers(args, False, args.device))
    parts, records = [], []
    for batch in T.progress(loader, "tower outputs"):
        for path, reason in batch["skipped"]:
            print(f"skipped, unreadable: {path}: {reason}", file=sys.stderr)
        if not batch["ids"]:
            continue
        inputs = T.model_inputs(batch, args.device, False)
        with ctx:
            video, audio = net.encode(inputs["video"], inputs["audio"])
        parts.append({"video_tokens": video, "audio_tokens": audio,
                      "video_mask": inputs["video_mask"], "audio_mask": inputs["audio_mask"]})
        records += batch["records"]
    if not records:
        raise data.UnreadableClips("no readable clip to fine-tune on")
    return {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]).cpu()
            .to(torch.float16 if parts[0][k].is_floating_point() else parts[0][k].dtype)
            for k in parts[0]}, records


class QueryClassifier(nn.Module):
    """4c, fine-tuning: a stage-2 checkpoint's Q-Former side (memory projections, queries,
    Q-Former) and a linear head on the mean of the queries' final outputs, trained together.
    It reads the frozen towers' outputs (tower_outputs), not pixels."""

    def __init__(self, net, classes):
        super().__init__()
        self.net = net
        self.head = nn.Linear(net.cfg.qformer.hidden, classes)

    def forward(self, video_tokens=None, audio_tokens=None, video_mask=None, audio_mask=None):
        memory, memory_mask = self.net.memory(video_tokens, audio_tokens, video_mask, audio_mask)
        _, queries = self.net.Qformer.read_memory(self.net.query_tokens, memory, memory_mask, outputs=True)
        return self.head(queries.mean(dim=1))  # (B, classes)


def finetune(net, towers, targets, args):
    """Fine-tune a copy of `net`'s Q-Former side with a head on one label field: AdamW at
    --finetune-lr, --finetune-epochs epochs over the training split in batches of
    --batch-size, cross-entropy (binary per class for several labels). The epoch with the best
    validation score is reported on the test split. towers, targets: {split: tower_outputs'
    tensors}, {split: (N, K) targets}."""
    multi_label = bool((targets["train"].sum(dim=1) > 1).any())
    torch.manual_seed(args.seed)
    towers_of_net = net.video_encoder, net.audio_encoder
    net.drop_encoders()  # not copied: the copy reads their outputs
    reader = copy.deepcopy(net)
    net.video_encoder, net.audio_encoder = towers_of_net
    for p in reader.parameters():
        p.requires_grad_(True)  # the parts no classification reads (the text's) get no gradient and stay
    model = QueryClassifier(reader, targets["train"].size(1)).to(args.device)
    optimizer = T.make_optimizer(model, args.finetune_lr, 0.05, device_type=args.device.type)

    def batches(split, order):
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            yield ({k: None if t is None else (t[idx].float() if t.is_floating_point() else t[idx]).to(args.device)
                    for k, t in towers[split].items()}, targets[split][idx].to(args.device))

    @torch.no_grad()
    def evaluate(split):
        model.eval()
        logits = torch.cat([model(**x).float().cpu() for x, _ in batches(split, torch.arange(len(targets[split])))])
        model.train()
        return scores(logits, targets[split], multi_label)

    best = None
    for epoch in T.progress(range(1, args.finetune_epochs + 1), "fine-tune"):
        for x, y in batches("train", torch.randperm(len(targets["train"]))):
            logits = model(**x).float()
            loss = F.binary_cross_entropy_with_logits(logits, y) if multi_label else F.cross_entropy(logits, y.argmax(1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val = evaluate("val")
        if best is None or next(iter(val.values())) > best[0]:
            best = (next(iter(val.values())), epoch, evaluate("test"))
    return {"epoch": best[1], **best[2]}


def main(argv=None):
    args = get_args(argv)
    args.device = T.setup_device(args.device)
    ctx = torch.autocast(args.device.type, enabled=False)
    data_dir, anns = T.resolve_data_paths(args)
    net, tokenizer = T.load_captioner(args)
    if args.random_qformer:
        net = untrained_reader(net)
    media = data.MediaConfig.from_model(net.cfg)
    splits = ("train", "val", "test") if args.probe or args.finetune else ("test",)
    feats, towers = {}, {}
    for split in splits:
        field, _ = data.caption_field_for(anns[split], args.caption_field)
        ds = data.AVCaptionDataset(anns[split], data_dir, media, field, modalities=args.modalities, by_clip=True)
        if args.finetune:
            towers[split] = tower_outputs(net, ds, args, ctx)
        if args.probe or args.zero_shot:
            feats[split] = split_features(net, ds, args, ctx)
        else:
            feats[split] = None, None, towers[split][1]
    out = {"modalities": args.modalities, "q-former": "untrained (--random-qformer)" if args.random_qformer else "trained"}
    for field in args.label:
        classes = sorted({label for split in splits for r in feats[split][2] for label in labels_of(r, field)})
        targets = {split: one_hot(feats[split][2], field, classes) for split in splits}
        multi_label = bool((targets["test"].sum(dim=1) > 1).any())
        result = {"classes": len(classes)}
        if args.zero_shot:
            logits = zero_shot(net, tokenizer, feats["test"][1], classes, args.templates, args.device, ctx)
            result["zero-shot"] = scores(logits, targets["test"], multi_label)
        if args.probe:
            result["probe"] = linear_probe(*((feats[s][0], targets[s]) for s in splits))
        if args.finetune:
            tuned = {s: one_hot(towers[s][1], field, classes) for s in splits}
            result["fine-tune"] = finetune(net, {s: towers[s][0] for s in splits}, tuned, args)
        out[field] = result
    print(json.dumps(out, indent=2), file=sys.stdout if args.out is None else sys.stderr)
    if args.out is not None:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        T.write_json(args.out, out)
    return 0


if __name__ == "__main__":
    T.run_script(main)
