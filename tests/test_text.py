"""The text tower LanguageBind bound its towers to: CLIP's text transformer (model.TextTransformer)
loaded from LanguageBind's layout (pretrained.map_text), and CLIP's byte-level BPE
(data.ClipTokenizer), each against transformers' own CLIP on shared weights and files."""

import json

import pytest
import torch

import data
import model as M
import pretrained as P
from tests import official_checkpoints as official


def hf_text_model(cfg):
    """transformers' CLIPTextModelWithProjection at `cfg`'s shapes, as LanguageBind's configs set
    it (exact GELU, end-of-text id 49407), with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
        hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.embed_dim,
        bos_token_id=49406, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id)).eval()


def test_the_official_text_keys_are_transformers_names():
    cfg = M.TextConfig(vocab_size=100, max_positions=16, width=32, layers=2, heads=4, mlp_dim=64, embed_dim=24)
    hf = {k: tuple(t.shape) for k, t in hf_text_model(cfg).state_dict().items()}
    # LanguageBind's files, saved by an older transformers, also hold the position_ids buffer
    assert hf == {k: s for k, s in official.clip_text(cfg).items() if not k.endswith("position_ids")}


@torch.no_grad()
def test_the_text_tower_reproduces_transformers_clip_at_full_size():
    """The full preset's text tower (LanguageBind's: CLIP ViT-L/14's text transformer) from a
    file in LanguageBind's layout (the text tower beside vision keys and logit_scale) gives
    transformers' hidden states and projected embedding, each row pooled at its first
    end-of-text token whatever padding follows."""
    cfg = M.TextConfig()
    hf = hf_text_model(cfg)
    sd = {**hf.state_dict(), "logit_scale": torch.tensor(4.6052),
          "vision_model.embeddings.class_embedding": torch.zeros(1024), "visual_projection.weight": torch.zeros(768, 1024)}
    ours = M.TextTransformer(cfg).eval()
    assert float(P.map_text(ours, sd, "pytorch_model.bin")) == pytest.approx(4.6052)
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, 20), cfg.eos_token_id)  # padded with <|endoftext|>, as LanguageBind's tokenizer pads
    for row, n in enumerate((20, 9, 4)):
        ids[row, 0] = 49406
        ids[row, 1:n - 1] = torch.randint(0, 49406, (n - 2,), generator=g)
    theirs = hf(input_ids=ids)
    hidden, embeds = ours(ids)
    torch.testing.assert_close(embeds, theirs.text_embeds, rtol=1e-4, atol=1e-4)
    for row, n in enumerate((20, 9, 4)):  # every position up to the end-of-text token
        torch.testing.assert_close(hidden[row, :n], theirs.last_hidden_state[row, :n], rtol=1e-4, atol=1e-4)


def learn_bpe(words, merges_wanted):
    """A small byte-level BPE vocabulary (vocab.json, merges.txt) learnt from `words` as CLIP's
    was: byte symbols, a word's last one marked `</w>`, the most frequent pair merged first."""
    # GPT-2's byte alphabet: printable bytes stand for themselves, the rest for chr(256 + n)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    symbols = sorted(byte.values())
    vocab = symbols + [s + "</w>" for s in symbols]
    corpus = [[byte[b] for b in w.encode()] for w in words]
    corpus = [w[:-1] + [w[-1] + "</w>"] for w in corpus]
    merges = []
    for _ in range(merges_wanted):
        pairs = {}
        for w in corpus:
            for a, b in zip(w, w[1:]):
                pairs[a, b] = pairs.get((a, b), 0) + 1
        if not pairs:
            break
        a, b = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        for w in corpus:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def test_the_clip_tokenizer_matches_transformers_clip_tokenizer(tmp_path):
    """Lower-casing, the split into words, digits, punctuation runs and contractions, the byte
    encoding, merges by rank and `</w>` ends: the same ids as transformers' CLIPTokenizer on the
    same vocabulary and merges, the project's read from vocab.json and merges.txt as the HF
    repos hold them."""
    from transformers import CLIPTokenizer
    corpus = ("a red circle moves up with rain in the background a green cross moves down with birds "
              "the blue triangle comes closer there is no background sound it's raining").split()
    vocab, merges = learn_bpe(corpus * 3, 60)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    texts = ["A red circle moves up with rain in the background.", "It's   2 o'clock:\tthe CROSS moves   down!!",
             "birds, 42 birds; no sound", "Unseen words: zebra-crossing 7x9"]
    ours = data.ClipTokenizer.from_folder(str(tmp_path)).encode(texts)
    reference = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    for row, text in zip(ours, texts):
        want = reference(text)["input_ids"]
        assert row[:len(want)].tolist() == want
        assert (row[len(want):] == vocab["<|endoftext|>"]).all()  # the padding
