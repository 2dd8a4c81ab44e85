"""Fine-tuning a Hugging Face directory trained elsewhere, through a 2-worker cluster.

The directory is what a user brings: a tiny GPT-2 made and trained with ``transformers`` (its own
shape, not a preset of this server: 48 wide, 3 heads, a 64-token context) and saved with
``save_pretrained``, and a byte-level BPE trained with ``tokenizers`` and saved through
``PreTrainedTokenizerFast``. The cluster (deployed with the default ``base`` preset) serves it,
fine-tunes it on the user's ``.txt`` file, and exports the result, which ``transformers`` loads.
What is checked is what the user would see: the cluster's text is the directory's text before
fine-tuning; training starts from the loaded weights (validation perplexity of the starting weights
far below that of the same model freshly initialised, and lower after the epoch than before); the
export keeps the directory's shape and writes the fine-tuned cluster's text.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio

PROMPT = "The river"
WHO = ["miller", "baker", "weaver", "smith"]
WHAT = ["wheat", "corn", "barley", "rye", "oats"]
HOW = ["slowly", "quietly", "gently", "swiftly"]
WHEN = ["morning", "evening", "night", "noon"]


def _lines(rng: random.Random, n: int, verb: str) -> list[str]:
    return [f"The river {rng.choice(HOW)} flows past the old mill where the {rng.choice(WHO)} {verb} "
            f"{rng.choice(WHAT)} every {rng.choice(WHEN)}." for _ in range(n)]


def _trained_elsewhere(root: Path) -> tuple[Path, Path]:
    """(a trained directory, the same model freshly initialised), both with the same tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = _lines(random.Random(0), 400, "grinds")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=48, n_layer=2, n_head=3,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    fresh = GPT2LMHeadModel(config)
    fresh.save_pretrained(root / "fresh")
    tok.save_pretrained(root / "fresh")
    model = GPT2LMHeadModel(config)
    model.load_state_dict(fresh.state_dict())
    stream = torch.tensor(sum((tok(t)["input_ids"] + [tok.eos_token_id] for t in texts), []))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        starts = torch.randint(0, len(stream) - 33, (8,), generator=gen)
        x = torch.stack([stream[s:s + 32] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(root / "trained")
    tok.save_pretrained(root / "trained")
    return root / "trained", root / "fresh"


def _greedy(directory: Path, n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    enc = tok(PROMPT, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


async def _fine_tune(client, cid: str, directory: Path, text: Path) -> tuple[float, float, dict]:
    """One epoch from ``directory`` on ``text``: (val perplexity of the starting weights, after, the run)."""
    run = await ok(client, "neural_train_distributed", {
        "cluster_id": cid, "dataset": str(text), "resume_from": str(directory), "epochs": 1, "batch_size": 8,
        "optimizer": "adam", "learning_rate": 0.003, "seed": 0, "wait": True, "wait_timeout_s": 300})
    assert run["status"] == "completed", run
    status = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
    ppl = {int(epoch): value for epoch, _, value in status["history"]["val_perplexity"]}
    assert set(ppl) == {0, 1}, status["history"]  # epoch 0: the starting weights, validated before step 1
    return ppl[0], ppl[1], run


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> tuple[Path, Path]:
    return _trained_elsewhere(tmp_path_factory.mktemp("elsewhere"))


def test_memory_check_counts_the_directory_model(elsewhere, tmp_path) -> None:
    """The node's estimate before a session (what memory_mb is checked against) is of the model that
    will train: the directory's, not the cluster's preset."""
    from transformers import AutoModelForCausalLM

    from workers.budget import estimate_training_memory
    from workers.data import load_dataset
    from workers.protocol import TrainJob

    text = tmp_path / "mill.txt"
    text.write_text("\n".join(_lines(random.Random(1), 50, "bakes")), encoding="utf-8")
    job = TrainJob(dataset=str(text), session_id="estimate", mode="sync", topology="mesh", architecture="transformer",
                   roles=["worker"], batch_size=8, resume_from=str(elsewhere[0]))
    estimate = estimate_training_memory(job, load_dataset(str(text)))
    assert estimate.parameters == AutoModelForCausalLM.from_pretrained(elsewhere[0]).num_parameters()
    preset = estimate_training_memory(job.model_copy(update={"resume_from": None}), load_dataset(str(text)))
    assert preset.parameters > 10 * estimate.parameters  # the base preset the nodes were deployed with


async def test_fine_tune_a_hugging_face_directory_trained_elsewhere(home, elsewhere) -> None:
    import shutil

    from transformers import AutoModelForCausalLM

    models, data = home / "models", home / "data"
    data.mkdir(parents=True)
    shutil.copytree(elsewhere[0].parent, models)  # under the state home: a path the server may read
    trained, fresh = models / "trained", models / "fresh"
    text = data / "mill.txt"  # the user's text: the same scenes, other trades
    text.write_text("\n".join(_lines(random.Random(1), 1200, "bakes")) + "\n", encoding="utf-8")

    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "finetune", "architecture": "transformer"}))[
            "cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        loaded = await ok(client, "neural_model_load", {"cluster_id": cid, "path": str(trained)})
        assert loaded["nodes_loaded"] == 2
        greedy = {"cluster_id": cid, "input_data": PROMPT, "temperature": 0, "max_new_tokens": 12}
        assert (await ok(client, "neural_predict_distributed", greedy))["prediction"] == _greedy(trained, 12)

        fresh_start, _, _ = await _fine_tune(client, cid, fresh, text)
        start, after, _ = await _fine_tune(client, cid, trained, text)
        vocab = AutoModelForCausalLM.from_pretrained(trained).config.vocab_size
        print({"start": start, "after": after, "fresh_start": fresh_start, "vocab": vocab})
        assert fresh_start > 0.5 * vocab  # a fresh model guesses about uniformly
        assert start < 0.1 * fresh_start  # the loaded weights are where training starts
        assert after < start  # and the epoch on the user's text improved them

        cluster_text = (await ok(client, "neural_predict_distributed", greedy))["prediction"]
        out = home / "exported"
        await ok(client, "neural_model_export", {"model_id": cid, "format": "huggingface", "destination": str(out)})
        exported = AutoModelForCausalLM.from_pretrained(out)
        assert (exported.config.n_embd, exported.config.n_head, exported.config.n_positions) == (48, 3, 64)
        original = AutoModelForCausalLM.from_pretrained(trained)
        assert not torch.equal(exported.transformer.h[0].mlp.c_fc.weight, original.transformer.h[0].mlp.c_fc.weight)
        assert _greedy(out, 12) == cluster_text
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
