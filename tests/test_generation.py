"""Text generation by a language-model cluster, its Hugging Face export and load, the LM benchmark.

Two small GPT-2 models (same BPE tokenizer, different weights) are trained once for the module
in this process and saved as Hugging Face directories; the cluster loads them like any directory
trained elsewhere. What is checked is what a user would notice: the cluster's greedy text is
the text ``transformers`` writes from the same weights, seeded sampling repeats, ensemble
decoding follows the mean of the two models' distributions (recomputed here in transformers),
and bad options are refused with a sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import err, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service.clusters import ClusterService
from flow_nexus_server.service.generation import ensemble_decode
from workers import protocol as p

PROMPT = "The future of artificial intelligence is"
CORPUS = [
    "The future of artificial intelligence is bright, said the researchers at the lab.",
    "The future of the markets is uncertain, said the central bank on Tuesday.",
    "Artificial intelligence is changing how the team trains its models every day.",
    "The researchers said the models learn from text and write new text.",
] * 30
CORPUS_B = [  # the second model reads other text: the two disagree
    "The future of artificial intelligence is dark, warned the critics of the markets.",
    "Critics said the bank and the team were wrong about the future of the models.",
] * 60


def _train_lm(tokenizer, corpus: list[str], seed: int, steps: int):
    """A small GPT-2 (base preset) trained for ``steps`` on the corpus; returns the TrainedModel."""
    from workers.models import TaskInfo, build_model
    from workers.training.common import TrainedModel

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    task = TaskInfo("lm", (), tokenizer.vocab_size, tokenizer.vocab_size, 128)
    model = build_model("transformer", "base", task)
    stream = torch.from_numpy(tokenizer.encode_stream(corpus))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 33, (4,), generator=gen)
        x = torch.stack([stream[s:s + 32] for s in starts])
        y = torch.stack([stream[s + 1:s + 33] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, task.vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return TrainedModel(model=model, task=task, tokenizer=tokenizer, label_names=[], architecture="transformer",
                        preset="base", max_len=128, metrics={"train_loss": float(loss.detach())})


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict[str, Path]:
    """Two trained LMs sharing a tokenizer, exported as Hugging Face directories."""
    from workers.data.bpe import BPETokenizer
    from workers.hf_export import export_huggingface

    root = tmp_path_factory.mktemp("lms")
    tokenizer = BPETokenizer.fit(CORPUS + CORPUS_B, 512)
    out = {}
    for name, corpus, seed in (("a", CORPUS, 0), ("b", CORPUS_B, 1)):
        out[name] = root / name
        export_huggingface(_train_lm(tokenizer, corpus, seed, 15), out[name], {}, {"session_id": f"test-{name}"})
    return out


def hf_greedy(directory: Path, prompt: str, n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def hf_next_distribution(directory: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits.double(), -1).numpy()


def test_export_layout_and_refusals(lms, tmp_path) -> None:
    from workers.hf_export import HuggingFaceError, load_huggingface

    names = {f.name for f in lms["a"].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert json.loads((lms["a"] / "generation_config.json").read_text())["eos_token_id"] == 0
    # A pickled checkpoint is refused with a sentence, never unpickled.
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((lms["a"] / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(HuggingFaceError, match="unpickle"):
        load_huggingface(bad)
    with pytest.raises(HuggingFaceError, match="memory_mb"):
        load_huggingface(lms["a"], memory_mb=1)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HuggingFaceError, match="GPT-2"):
        load_huggingface(llama)


def test_node_generation_matches_transformers_and_seeds_repeat(lms) -> None:
    from workers.generation import generate
    from workers.hf_export import load_huggingface
    from workers.inference import InferenceError

    trained, _ = load_huggingface(lms["a"])
    greedy = p.GenerationOptions(max_new_tokens=20)
    first = generate(trained, PROMPT, greedy)
    assert first.text == generate(trained, PROMPT, greedy).text == hf_greedy(lms["a"], PROMPT, 20)
    assert len(first.token_ids) == 20 or first.stopped == "eos"
    assert first.mean_logprob < 0 and first.tokens_per_second > 0 and first.first_token_ms > 0
    sampled = p.GenerationOptions(max_new_tokens=20, temperature=1.2, top_k=50, top_p=0.95, seed=7)
    a, b = generate(trained, PROMPT, sampled), generate(trained, PROMPT, sampled)
    assert a.token_ids == b.token_ids
    hot = p.GenerationOptions(max_new_tokens=20, temperature=2.0)
    others = {tuple(generate(trained, PROMPT, hot.model_copy(update={"seed": s})).token_ids) for s in range(4)}
    assert len(others) > 1  # the seed matters: sampling really samples
    with pytest.raises(InferenceError, match="context of 128"):
        generate(trained, PROMPT, p.GenerationOptions(max_new_tokens=128))
    with pytest.raises(InferenceError, match="shorten the prompt"):
        generate(trained, "word " * 120, p.GenerationOptions(max_new_tokens=32))


def test_sampling_filters() -> None:
    from workers.sampling import choose, filtered

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(filtered(probs, 2, None), [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(filtered(probs, None, 0.8), [0.625, 0.375, 0, 0])  # 0.5 + 0.3 reaches 0.8
    np.testing.assert_allclose(filtered(probs, None, 0.1), [1, 0, 0, 0])
    opts = p.GenerationOptions(temperature=1.0, top_k=2, seed=1)
    draws = {choose(probs, opts, np.random.default_rng(s)) for s in range(50)}
    assert draws == {0, 1}


def test_prompt_forms_and_choosing_among_continuations() -> None:
    from flow_nexus_server.service.errors import ServiceError
    from flow_nexus_server.service.generation import choose_continuation, prompts_of

    assert prompts_of(PROMPT) == prompts_of({"text": PROMPT}) == [PROMPT]
    assert prompts_of(json.dumps(json.dumps({"text": PROMPT}))) == [PROMPT]
    assert prompts_of(json.dumps([{"text": "a"}, "b"])) == ["a", "b"]
    assert prompts_of("{not json") == ["{not json"]  # text that only looks like JSON is the prompt
    with pytest.raises(ServiceError, match="continues text"):
        prompts_of({"pixels": [1, 2]})

    def cont(text: str, lp: float) -> p.Continuation:
        return p.Continuation(text=text, token_ids=[1], prompt_tokens=1, mean_logprob=lp, stopped="length",
                              latency_ms=1, first_token_ms=1, tokens_per_second=1)

    conts = [cont(" x", -3.0), cont(" y", -0.1), cont(" x", -2.5)]
    assert choose_continuation(conts, "majority") == (0, 2 / 3)  # two nodes wrote " x"
    # weighted: exp(-0.1) = 0.90 outweighs exp(-3) + exp(-2.5) = 0.13
    assert choose_continuation(conts, "weighted") == (1, 1 / 3)


@pytest.mark.anyio
async def test_cluster_generates_ensembles_exports_and_benchmarks(lms, tmp_path) -> None:
    home = tmp_path / "home"
    settings = Settings.from_env(home)
    svc = ClusterService(settings)
    data = home / "models"
    data.mkdir(parents=True)
    import shutil

    for name in ("a", "b"):
        shutil.copytree(lms[name], data / name)
    async with Client(build_server(settings, service=svc)) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "lm", "architecture": "transformer"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 2})
        loaded = await ok(client, "neural_model_load", {"cluster_id": cid, "path": str(data / "a")})
        assert loaded["nodes_loaded"] == 2 and loaded["model"]["kind"] == "lm"

        # Greedy through the cluster: every input form, deterministic, the text transformers writes.
        expected = hf_greedy(lms["a"], PROMPT, 12)
        for form in (PROMPT, json.dumps({"text": PROMPT}), json.dumps(json.dumps({"text": PROMPT}))):
            pred = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": form,
                                                                   "temperature": 0, "max_new_tokens": 12})
            assert pred["prediction"] == expected, form
            assert pred["aggregation_method"] == "ensemble" and pred["nodes_used"] == 2
            assert pred["total_latency_ms"] > 0 and pred["confidence"] < 0
        batch = await ok(client, "neural_predict_distributed", {
            "cluster_id": cid, "input_data": json.dumps([{"text": PROMPT}, "Markets"]), "aggregation": "majority",
            "max_new_tokens": 8})
        assert len(batch["prediction"]) == 2 and batch["prediction"][0] == hf_greedy(lms["a"], PROMPT, 8)
        for node in batch["individual_predictions"]:
            assert node["tokens_per_second"] > 0 and node["confidence"] < 0 and node["latency_ms"] > 0
        seeded = {"cluster_id": cid, "input_data": PROMPT, "temperature": 0.9, "top_p": 0.9, "seed": 3,
                  "aggregation": "weighted", "max_new_tokens": 8}
        assert (await ok(client, "neural_predict_distributed", seeded))["prediction"] == \
            (await ok(client, "neural_predict_distributed", seeded))["prediction"]

        # Bad options: a sentence each, nothing served.
        for bad, word in (({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
                          ({"top_p": 0}, "top_p"), ({"max_new_tokens": 200}, "context")):
            message = await err(client, "neural_predict_distributed",
                                {"cluster_id": cid, "input_data": PROMPT, **bad})
            assert word in message and "Traceback" not in message, message

        # Export from the cluster: transformers reproduces the cluster's text.
        out = tmp_path / "home" / "exported"
        exported = await ok(client, "neural_model_export", {"model_id": cid, "format": "huggingface",
                                                            "destination": str(out)})
        assert exported["format"] == "huggingface" and (out / "model.safetensors").is_file()
        assert hf_greedy(out, PROMPT, 12) == expected

        # Ensemble of two different models: node 2 serves model b.
        cluster = svc.get_cluster(cid)
        nodes = [n for n in svc.store.nodes(cid)]
        clients = [svc.client(cluster, n) for n in nodes]
        clients[1].load_model(p.LoadRequest(path=str(data / "b")))
        alone = [hf_greedy(lms[k], PROMPT, 12) for k in ("a", "b")]
        steps: list[tuple[list[np.ndarray], np.ndarray]] = []
        joint = ensemble_decode(clients, PROMPT, p.GenerationOptions(max_new_tokens=12),
                                np.random.default_rng(0), lambda i, dists, mean: steps.append((dists, mean)))
        assert joint["text"] not in alone, (joint["text"], alone)
        from workers.data.bpe import BPETokenizer
        from workers.hf_export import load_huggingface

        tokenizer: BPETokenizer = load_huggingface(lms["a"])[0].tokenizer
        ids = tokenizer.ids(PROMPT)
        for i, (_, mean) in enumerate(steps[:4]):  # recomputed without the nodes' caches
            prefix = ids + joint["token_ids"][:i]
            pa, pb = hf_next_distribution(lms["a"], prefix), hf_next_distribution(lms["b"], prefix)
            np.testing.assert_allclose(mean, (pa + pb) / 2, atol=2e-5)
            assert joint["token_ids"][i] == int(np.argmax(mean))
        majority = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": PROMPT,
                                                                   "aggregation": "majority", "max_new_tokens": 12})
        assert sorted(n["prediction"] for n in majority["individual_predictions"]) == sorted(alone)
        assert majority["prediction"] in alone
        ens = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": PROMPT,
                                                              "aggregation": "mean", "max_new_tokens": 12})
        assert ens["prediction"] == joint["text"] and ens["aggregation_method"] == "ensemble"

        # The LM benchmark measures generation.
        bench = await ok(client, "neural_performance_benchmark", {"model_id": cid, "benchmark_type": "inference",
                                                                   "input_data": PROMPT, "runs": 5})
        res = bench["results"]
        assert res["tokens_per_second"] > 0 and res["prompt_tokens_per_second"] > 0
        assert 0 < res["token_latency_p50_ms"] <= res["token_latency_p95_ms"]
        assert 0 < res["first_token_ms"] and res["cluster_tokens_per_second"] > 0



def test_resume_from_a_hugging_face_directory(lms) -> None:
    """resume_from names a Hugging Face directory: the trainer's checkpoint reader gives its weights,
    tokenizer and context, which a model of the job's preset takes as they are (fine-tuning start)."""
    from workers.data import load_tokenizer
    from workers.generation import generate
    from workers.models import TaskInfo, build_model
    from workers.training.checkpoint import load_state, read_checkpoint
    from workers.training.common import TrainedModel

    ck = read_checkpoint(lms["a"])
    assert ck["epoch"] == 0 and ck["optimizer_state"] is None and ck["tokenizer"]["type"] == "bpe"
    task = TaskInfo(**{**ck["task"], "input_shape": tuple(ck["task"]["input_shape"])})
    model = build_model("transformer", "base", task)  # what the engine builds for the job
    load_state(model, ck["model_state"], str(lms["a"]))
    tokenizer = load_tokenizer(ck["tokenizer"])
    resumed = TrainedModel(model=model.eval(), task=task, tokenizer=tokenizer, label_names=[],
                           architecture="transformer", preset="base", max_len=task.max_len)
    assert generate(resumed, PROMPT, p.GenerationOptions(max_new_tokens=12)).text == hf_greedy(lms["a"], PROMPT, 12)
