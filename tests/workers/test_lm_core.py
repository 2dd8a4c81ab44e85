"""The language-model core: the byte-level BPE tokenizer and the transformers GPT-2 model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from workers.data import DatasetError, Tokenizer, load_dataset, load_tokenizer
from workers.data.bpe import EOS_TOKEN, BPETokenizer, pretoken_counts
from workers.models import ModelError, TaskInfo, build_model, describe_model
from workers.models.gpt import GPT_PRESETS, GPTLanguageModel, requested_vocab_size

CORPUS = [
    "The future of artificial intelligence is bright, said the researchers.",
    "Markets rallied on Tuesday as the central bank held interest rates.",
    "The team won the final 3-1 after extra time; fans celebrated in the streets.",
    "Naïve café owners sell crème brûlée for £4.50 — a bargain!",
] * 20


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.fit(CORPUS, vocab_size=400)


def test_bpe_round_trips_text_and_ends_documents(bpe: BPETokenizer) -> None:
    for text in CORPUS[:4] + ["unseen wörds ✓ and\ttabs\n\nnewlines  spaces"]:
        assert bpe.decode(bpe.ids(text)) == text
    assert bpe.eos_id == 0 and bpe.hf.id_to_token(0) == EOS_TOKEN
    assert 300 < bpe.vocab_size <= 400
    # merges were learned: common words are one token, far fewer tokens than bytes
    assert len(bpe.ids(CORPUS[0])) < len(CORPUS[0].encode()) / 2
    stream = bpe.encode_stream(CORPUS[:2])
    assert stream.dtype.name == "int64" and list(stream).count(bpe.eos_id) == 2
    assert stream[-1] == bpe.eos_id and bpe.decode(stream) == CORPUS[0] + EOS_TOKEN + CORPUS[1] + EOS_TOKEN


def test_bpe_from_counts_equals_bpe_from_texts_and_is_deterministic(bpe: BPETokenizer) -> None:
    halves = [pretoken_counts(CORPUS[::2]), pretoken_counts(CORPUS[1::2])]
    merged = halves[0] + halves[1]  # what ranks sum from the workers' summaries
    assert BPETokenizer.fit_counts(merged, 400) == bpe
    assert all(" the" in h for h in halves) and not any(CORPUS[0] in h for h in halves)  # counts, not texts
    # another interpreter (another hash seed) builds byte-for-byte the same tokenizer
    code = ("import json,sys; from workers.data.bpe import BPETokenizer; "
            "print(BPETokenizer.fit(json.loads(sys.stdin.read()), 400).hf.to_str())")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(CORPUS), capture_output=True, text=True,
                         check=True, timeout=120, env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert json.loads(out.stdout) == json.loads(bpe.hf.to_str())


def test_bpe_saves_loads_and_converts(bpe: BPETokenizer) -> None:
    d = json.loads(json.dumps(bpe.to_dict()))
    assert d["type"] == "bpe"
    again = load_tokenizer(d)
    assert isinstance(again, BPETokenizer) and again == bpe
    word = Tokenizer.fit(CORPUS, 50)
    assert load_tokenizer(word.to_dict()) == word
    with pytest.raises(DatasetError, match="unknown saved tokenizer type"):
        load_tokenizer({"type": "sentencepiece"})
    with pytest.raises(DatasetError, match="does not load"):
        BPETokenizer.from_dict({"type": "bpe", "tokenizer_json": "{not json"})
    fast = bpe.to_transformers()
    assert fast.eos_token == fast.bos_token == fast.unk_token == EOS_TOKEN and fast.eos_token_id == 0
    assert fast(CORPUS[0])["input_ids"] == bpe.ids(CORPUS[0])
    assert fast.decode(bpe.ids(CORPUS[2])) == CORPUS[2]


def test_bpe_refuses_tiny_vocabularies() -> None:
    with pytest.raises(DatasetError, match="at least 258"):
        BPETokenizer.fit(CORPUS, 100)


def test_bpe_on_bbc_news_is_fast_and_compact() -> None:
    texts = load_dataset("bbc-news-lm").X[:300]
    tok = BPETokenizer.fit(texts, 4096)
    ids = tok.encode_stream(texts)
    words = sum(len(t.split()) for t in texts)
    assert tok.vocab_size == 4096 and words < ids.size < 1.6 * words


LM = TaskInfo("lm", (), 300, vocab_size=300, max_len=32)


def test_gpt_presets_map_onto_the_transformers_config() -> None:
    model = build_model("transformer", "base", LM)
    assert isinstance(model, GPTLanguageModel)
    from transformers import GPT2LMHeadModel

    assert isinstance(model.hf, GPT2LMHeadModel)
    cfg = model.hf_config
    base = GPT_PRESETS["base"]
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_inner) == (base["n_embd"], base["n_layer"], base["n_head"],
                                                                   base["n_inner"])
    assert (cfg.vocab_size, cfg.n_positions, cfg.eos_token_id) == (300, 32, 0)
    xl = GPT_PRESETS["xl"]
    assert (xl["n_embd"], xl["n_layer"], xl["n_head"]) == (768, 12, 12)  # GPT-2 small
    with torch.device("meta"):
        big = build_model("transformer", "xl", TaskInfo("lm", (), 50257, vocab_size=50257, max_len=1024))
    # GPT-2 small has 124,439,808 parameters (tied embeddings counted once)
    assert describe_model(big)["parameters"] == 124_439_808
    # tied output: counted once
    n = describe_model(model)["parameters"]
    assert n == sum(p.numel() for p in model.hf.parameters())
    assert model.hf.lm_head.weight is model.hf.transformer.wte.weight


def test_gpt_forward_is_causal_and_checks_input() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", "base", LM).eval()
    ids = torch.randint(0, 300, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 300)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 300
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-5)
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])
    with pytest.raises(ValueError, match="exceeds the model's max_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="token id out of range"):
        model(torch.full((1, 4), 300))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(4, dtype=torch.long))


def test_gpt_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(1)
    plain = build_model("transformer", "base", LM)
    ckpt = build_model("transformer", "base", LM, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.gradient_checkpointing and ckpt.hf_checkpointing
    assert not plain.hf_checkpointing
    ids = torch.randint(0, 300, (2, 16))
    grads = []
    for m in (plain, ckpt):
        m.train()
        m(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        assert all(p.grad is not None for p in m.parameters())  # every parameter takes part
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
    ckpt.gradient_checkpointing = False
    assert not ckpt.hf_checkpointing


def test_gpt_custom_layers_map_onto_the_config() -> None:
    layers = [{"type": "embedding", "embedding_dim": 48, "vocab_size": 500},
              {"type": "transformer_block", "num_heads": 3, "hidden_dim": 96, "num_layers": 2},
              {"type": "transformer_block", "num_heads": 3, "hidden_dim": 96},
              {"type": "output"}]
    model = build_model("transformer", "custom", LM, layers=layers)
    cfg = model.hf_config
    assert (cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.n_layer, cfg.vocab_size) == (48, 3, 96, 3, 300)
    assert requested_vocab_size("custom", layers) == 500
    assert requested_vocab_size("custom", [{"type": "output", "num_classes": 700}]) == 700
    assert requested_vocab_size("large", None) == GPT_PRESETS["large"]["vocab_size"]
    for bad, match in [
        ([{"type": "embedding", "embedding_dim": 48}, {"type": "lstm", "hidden_size": 8}], "use architecture 'rnn'"),
        ([{"type": "transformer_block", "num_heads": 2}], "'embedding' layer first"),
        ([{"type": "embedding", "embedding_dim": 50}, {"type": "transformer_block", "num_heads": 4}],
         "does not divide embedding_dim 50"),
        ([{"type": "embedding", "embedding_dim": 48}], "add a 'transformer_block'"),
    ]:
        with pytest.raises(ModelError, match=match):
            build_model("transformer", "custom", LM, layers=bad)
