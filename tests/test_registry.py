"""The model registry: register -> evaluate -> promote -> a worse candidate refused by the quality gate
-> rollback; an incompatible label set refused by the compatibility gate; manifests verify and a
tampered artifact is refused at load; a release folder copied to another home registers unchanged;
an ensemble of two sites trained on label-skewed halves of digits beats both."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import err, held_out_digits, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digits_train_split() -> tuple[np.ndarray, np.ndarray]:
    """The digits examples training may see: all but the held-out split the evaluation uses."""
    from workers.data import load_dataset, train_val_split

    ds = load_dataset("digits")
    train, _ = train_val_split(len(ds), 0.2, 0, stratify=ds.y)
    return ds.X[train], ds.y[train]


def skewed_half(X: np.ndarray, y: np.ndarray, major: set[int], minority_share: float, seed: int) -> str:
    """Every example of the ``major`` classes and ``minority_share`` of the others, as inline JSON."""
    rng = np.random.default_rng(seed)
    keep = np.array([label in major or rng.random() < minority_share for label in y])
    return json.dumps({"X": X[keep].tolist(), "y": y[keep].tolist()})


async def trained_cluster(client, dataset: str, epochs: int, learning_rate: float, nodes: int = 1) -> str:
    cid = (await ok(client, "neural_cluster_init", {"name": "site", "architecture": "mlp", "max_nodes": 4}))[
        "cluster_id"]
    await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": nodes})
    await ok(client, "neural_cluster_connect", {"cluster_id": cid})
    run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": dataset, "epochs": epochs,
                                                        "learning_rate": learning_rate, "wait": True})
    assert run["status"] == "completed"
    return cid


async def retrain(client, cid: str, dataset: str, epochs: int, learning_rate: float) -> None:
    run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": dataset, "epochs": epochs,
                                                        "learning_rate": learning_rate, "wait": True})
    assert run["status"] == "completed"


def export_folder(directory: Path, classes: int, steps: int, seed: int = 0) -> Path:
    """A model of this server's export layout, trained here in-process for ``steps`` full-batch steps on
    the digits training split (its classes below ``classes``): what a site would ship."""
    import torch

    from workers.models import TaskInfo, build_model
    from workers.serving import export_model
    from workers.training.common import TrainedModel

    torch.set_num_threads(1)  # the host's cores belong to the node processes
    torch.manual_seed(seed)
    X, y = digits_train_split()
    keep = y < classes
    xs, ys = torch.tensor(X[keep], dtype=torch.float32), torch.tensor(y[keep])
    task = TaskInfo("vectors", (64,), classes)
    model = build_model("mlp", "base", task)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    trained = TrainedModel(model=model.eval(), task=task, tokenizer=None, label_names=[str(c) for c in range(classes)],
                           architecture="mlp", preset="base", max_len=0)
    export_model(trained, directory, "safetensors", {}, {"dataset": "digits", "seed": seed})
    return directory


async def test_gates_rollback_tamper_and_copy_with_exported_models(home, tmp_path):
    """Register export folders (trained in-process), evaluate through one small serving cluster, promote,
    refuse a worse one by quality and an incompatible one by compatibility, roll back, refuse a tampered
    artifact at load; the release folder registers unchanged in another home."""
    home.mkdir(mode=0o700, parents=True)
    good, better, worse, five = (export_folder(home / "in" / n, c, k) for n, c, k in
                                 (("good", 10, 40), ("better", 10, 150), ("worse", 10, 2), ("five", 5, 2)))
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "serving", "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "count": 1})
        first = await ok(client, "neural_model_register", {"source": str(good), "name": "digits", "notes": "site A"})
        manifest, folder = first["manifest"], Path(first["directory"])
        assert first["version"] == "1.0.0" and json.loads((folder / "manifest.json").read_text()) == manifest
        for name, entry in manifest["files"].items():  # manifests verify
            assert sha256(folder / name) == entry["sha256"], name
        assert manifest["contract"]["labels"] == [str(d) for d in range(10)] and manifest["notes"] == "site A"
        assert manifest["provenance"]["package_version"] and manifest["dataset_fingerprint"]["sha256"]

        evaluate = {"name": "digits", "dataset": "digits", "cluster_id": cid}
        report = (await ok(client, "neural_model_evaluate", {**evaluate, "version": "1.0.0"}))["report"]
        assert report["examples"] == 359 and 0.5 < report["accuracy"] <= 1 and 0 < report["macro_f1"] <= 1
        assert 0 < report["latency_p50_ms"] <= report["latency_p95_ms"] and report["size_mb"] > 0
        assert 0 < report["robustness"] < report["accuracy"] and report["nan_outputs"] is False
        promoted = await ok(client, "neural_model_promote", {"name": "digits", "version": "1.0.0"})
        assert promoted["promoted"] and promoted["stable"] == "1.0.0" and promoted["gates"][0]["threshold"] == 0.5
        assert [x["name"] for x in promoted["gates"]] == ["quality", "latency", "compatibility", "safety"]

        # This host is shared (latency) and the longer-trained model is a little less robust: not what these steps test.
        lenient = {"latency_factor": 20, "robustness_tolerance": 0.05}
        assert (await ok(client, "neural_model_register", {"source": str(better), "name": "digits"}))["version"] \
            == "1.1.0"
        await ok(client, "neural_model_evaluate", {**evaluate, "version": "1.1.0"})
        promoted = await ok(client, "neural_model_promote", {"name": "digits", "version": "1.1.0", "gates": lenient})
        assert promoted["promoted"], promoted["message"]
        assert promoted["gates"][0]["value"] >= promoted["gates"][0]["threshold"] == report["accuracy"]

        await ok(client, "neural_model_register", {"source": str(worse), "name": "digits"})
        await ok(client, "neural_model_evaluate", {**evaluate, "version": "1.2.0"})
        refused = await client.call_tool("neural_model_promote", {"name": "digits", "version": "1.2.0",
                                                                   "gates": lenient})
        out = refused.structured_content
        assert not refused.is_error and out["promoted"] is False and out["stable"] == "1.1.0"
        assert "the quality gate failed" in out["message"] and "quality gate" in refused.content[0].text
        assert not out["gates"][0]["passed"] and out["gates"][0]["value"] < out["gates"][0]["threshold"]

        five_v = (await ok(client, "neural_model_register", {"source": str(five), "name": "digits"}))["version"]
        assert five_v == "2.0.0"  # another label set: a breaking change
        out = await ok(client, "neural_model_promote", {"name": "digits", "version": "2.0.0"})
        assert out["promoted"] is False and "the compatibility gate failed" in out["message"]
        assert [x["name"] for x in out["gates"] if not x["passed"] and x["value"] is not None] == ["compatibility"]
        assert "labels" in out["gates"][2]["value"]

        listed = (await ok(client, "neural_model_list", {"name": "digits"}))["releases"]
        assert [(x["version"], x["aliases"]) for x in listed] == [
            ("1.0.0", ["previous"]), ("1.1.0", ["stable"]), ("1.2.0", []), ("2.0.0", [])]
        assert listed[2]["gates"][0]["passed"] is False and "digits" in listed[1]["evaluations"]
        got = await ok(client, "neural_model_get", {"name": "digits", "version": "stable"})
        assert got["release"]["version"] == "1.1.0" and got["release"]["manifest"]["files"]

        load = await ok(client, "neural_model_load", {"cluster_id": cid, "path": "registry:digits@stable"})
        assert load["release"] == "digits@1.1.0"
        X, y = held_out_digits(20)
        pred = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(X)})
        assert pred["release"] == "digits@1.1.0"
        back = await ok(client, "neural_model_rollback", {"name": "digits"})
        assert (back["stable"], back["rolled_back"], back["previous"]) == ("1.0.0", "1.1.0", None)
        assert back["clusters_reloaded"] == [cid] and "rolled back from 1.1.0 to 1.0.0" in back["message"]
        pred = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(X)})
        assert pred["release"] == "digits@1.0.0"
        assert "no previous" in await err(client, "neural_model_rollback", {"name": "digits"})

        # Automatic rollback: 1.1.0 back to stable with an SLO no real prediction keeps (p95 under 1 microsecond
        # over 3 predictions): the cluster following stable serves 1.1.0, breaks it, and stable rolls back.
        again = await ok(client, "neural_model_promote", {"name": "digits", "version": "1.1.0", "gates": lenient,
                                                          "slo": {"max_p95_ms": 0.001, "window": 3}})
        assert again["promoted"] and again["stable"] == "1.1.0"
        for _ in range(3):
            pred = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(X)})
            assert pred["release"] == "digits@1.1.0"
        pred = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(X)})
        assert pred["release"] == "digits@1.0.0"
        stable = (await ok(client, "neural_model_get", {"name": "digits", "version": "stable"}))["release"]
        assert stable["version"] == "1.0.0"
        events = Settings.from_env(home)
        from flow_nexus_server.store import Store
        from flow_nexus_server.store.tables import Event

        store = Store(events.db_url)
        with store.session() as s:
            messages = [e.message for e in s.query(Event).filter(Event.kind == "model_rolled_back")]
        store.close()
        assert any("automatic: SLO breach on cluster " + cid in m and "p95 latency" in m for m in messages), messages

        weights = Path(listed[1]["directory"]) / "model.safetensors"
        weights.chmod(0o600)
        with weights.open("ab") as f:
            f.write(b"\0")
        text = await err(client, "neural_model_load", {"cluster_id": cid, "path": "registry:digits@1.1.0"})
        assert "model.safetensors" in text and "sha256" in text
        pred = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(X)})
        assert pred["release"] == "digits@1.0.0"  # the refused load changed nothing

        assert "no version 9.9.9" in await err(client, "neural_model_get", {"name": "digits", "version": "9.9.9"})
        assert "not an export of this server" in await err(client, "neural_model_register",
                                                           {"source": str(home / "in"), "name": "digits"})
        assert "name" in await err(client, "neural_model_register", {"source": str(good), "name": "../x"})
        assert len((await ok(client, "neural_model_list", {}))["releases"]) == 4

    other_home = tmp_path / "elsewhere"
    other_home.mkdir(mode=0o700)
    shutil.copytree(folder, other_home / "incoming")
    async with Client(build_server(Settings.from_env(other_home))) as client:
        again = await ok(client, "neural_model_register", {"source": str(other_home / "incoming"), "name": "digits"})
        assert again["version"] == "1.0.0" and again["manifest"] == manifest


@pytest.mark.registryslow
async def test_register_evaluate_promote_refuse_rollback_and_serve(home, tmp_path):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = await trained_cluster(client, "digits", epochs=2, learning_rate=0.003, nodes=2)
        first = await ok(client, "neural_model_register", {"source": cid, "name": "digits-mlp", "notes": "site A"})
        assert first["version"] == "1.0.0"
        manifest = first["manifest"]
        folder = Path(first["directory"])
        assert json.loads((folder / "manifest.json").read_text()) == manifest
        assert {"model.safetensors", "config.json", "README.md"} <= set(manifest["files"])
        for name, entry in manifest["files"].items():  # manifests verify
            assert sha256(folder / name) == entry["sha256"], name
        assert manifest["contract"]["labels"] == [str(d) for d in range(10)]
        assert manifest["provenance"]["cluster"] == cid and len(manifest["provenance"]["nodes"]) == 2
        assert manifest["training_config"]["dataset"] == "digits" and manifest["dataset_fingerprint"]["sha256"]
        assert "accuracy" in manifest["metrics"] and manifest["model_card"].startswith("#")

        # The canonical evaluation, through the cluster itself (it then serves the release).
        report = (await ok(client, "neural_model_evaluate", {"name": "digits-mlp", "version": "1.0.0",
                                                             "dataset": "digits", "cluster_id": cid}))["report"]
        assert report["examples"] == 359 and 0.5 < report["accuracy"] <= 1 and 0 < report["macro_f1"] <= 1
        assert 0 < report["latency_p50_ms"] <= report["latency_p95_ms"] and report["size_mb"] > 0
        assert 0 < report["robustness"] <= 1 and report["nan_outputs"] is False
        first_gates = await ok(client, "neural_model_promote", {"name": "digits-mlp", "version": "1.0.0"})
        assert first_gates["promoted"] and first_gates["stable"] == "1.0.0"
        assert [x["name"] for x in first_gates["gates"]] == ["quality", "latency", "compatibility", "safety"]

        # A better candidate (trained longer) passes; a generous latency factor: this host is shared.
        await retrain(client, cid, "digits", epochs=8, learning_rate=0.003)
        better = await ok(client, "neural_model_register", {"source": cid, "name": "digits-mlp"})
        assert better["version"] == "1.1.0"
        promoted = await ok(client, "neural_model_promote", {"name": "digits-mlp", "version": "1.1.0",
                                                              "dataset": "digits", "gates": {"latency_factor": 20}})
        assert promoted["promoted"], promoted["message"]
        quality = promoted["gates"][0]
        assert quality["passed"] and quality["value"] >= quality["threshold"] == report["accuracy"]

        # A worse one (one epoch at a tiny rate) is refused by the quality gate, evaluated on a temporary cluster.
        await retrain(client, cid, "digits", epochs=1, learning_rate=0.0002)
        worse = await ok(client, "neural_model_register", {"source": cid, "name": "digits-mlp"})
        refused = await client.call_tool("neural_model_promote", {"name": "digits-mlp", "version": worse["version"],
                                                                   "dataset": "digits",
                                                                   "gates": {"latency_factor": 20}})
        assert not refused.is_error
        out = refused.structured_content
        assert out["promoted"] is False and out["stable"] == "1.1.0"
        assert "quality gate" in refused.content[0].text
        assert not next(x for x in out["gates"] if x["name"] == "quality")["passed"]
        clusters = (await ok(client, "neural_cluster_list", {}))["clusters"]
        temporary = [c for c in clusters if c["name"] == "registry-eval"]
        assert temporary and all(c["status"] == "terminated" for c in temporary)

        listed = (await ok(client, "neural_model_list", {"name": "digits-mlp"}))["releases"]
        assert [(x["version"], x["aliases"]) for x in listed] == [("1.0.0", ["previous"]), ("1.1.0", ["stable"]),
                                                                  ("1.2.0", [])]
        assert listed[2]["gates"][0]["passed"] is False and "digits" in listed[1]["evaluations"]

        # Serving by alias; predictions name the release; rollback moves the clusters following stable.
        load = await ok(client, "neural_model_load", {"cluster_id": cid, "path": "registry:digits-mlp@stable"})
        assert load["release"] == "digits-mlp@1.1.0" and load["nodes_loaded"] == 2
        X, y = held_out_digits(50)
        pred = await ok(client, "neural_predict_distributed",
                        {"cluster_id": cid, "input_data": json.dumps({"inputs": X, "labels": y})})
        assert pred["release"] == "digits-mlp@1.1.0"
        back = await ok(client, "neural_model_rollback", {"name": "digits-mlp"})
        assert back["stable"] == "1.0.0" and back["rolled_back"] == "1.1.0" and back["clusters_reloaded"] == [cid]
        pred = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(X[:3])})
        assert pred["release"] == "digits-mlp@1.0.0"
        assert "no previous" in await err(client, "neural_model_rollback", {"name": "digits-mlp"})
        assert "rolled back from 1.1.0 to 1.0.0" in back["message"]

        # A tampered artifact is refused at load, naming the file.
        weights = Path(better["directory"]) / "model.safetensors"
        weights.chmod(0o600)
        with weights.open("ab") as f:
            f.write(b"\0")
        text = await err(client, "neural_model_load", {"cluster_id": cid, "path": "registry:digits-mlp@1.1.0"})
        assert "model.safetensors" in text and "sha256" in text
        pred = await ok(client, "neural_predict_distributed", {"cluster_id": cid, "input_data": json.dumps(X[:3])})
        assert pred["release"] == "digits-mlp@1.0.0"  # nothing changed

        # An incompatible label set (a model of digits 0-4 only) is a major version, refused by compatibility.
        Xt, yt = digits_train_split()
        few = yt < 5
        await retrain(client, cid, json.dumps({"X": Xt[few].tolist(), "y": yt[few].tolist()}), 1, 0.003)
        other = await ok(client, "neural_model_register", {"source": cid, "name": "digits-mlp"})
        assert other["version"] == "2.0.0"
        refused = await client.call_tool("neural_model_promote", {"name": "digits-mlp", "version": "2.0.0"})
        out = refused.structured_content
        assert out["promoted"] is False and "compatibility gate" in refused.content[0].text
        assert [x["name"] for x in out["gates"] if not x["passed"] and x["value"] is not None] == ["compatibility"]
        assert "labels" in out["gates"][2]["value"]

        # Bad input: clear sentences, nothing registered.
        assert "no version 9.9.9" in await err(client, "neural_model_get", {"name": "digits-mlp", "version": "9.9.9"})
        assert "not an export of this server" in await err(client, "neural_model_register",
                                                           {"source": str(home), "name": "digits-mlp"})
        assert "name" in await err(client, "neural_model_register", {"source": cid, "name": "../x"})
        assert len((await ok(client, "neural_model_list", {}))["releases"]) == 4

    # The 1.0.0 folder copied to another home registers there unchanged.
    other_home = tmp_path / "elsewhere"
    other_home.mkdir(mode=0o700)
    copy = other_home / "incoming"
    shutil.copytree(first["directory"], copy)
    async with Client(build_server(Settings.from_env(other_home))) as client:
        again = await ok(client, "neural_model_register", {"source": str(copy), "name": "digits-mlp"})
        assert again["version"] == "1.0.0" and again["manifest"] == manifest


@pytest.mark.registryslow
async def test_ensemble_of_label_skewed_sites_beats_both_and_distills(home):
    X, y = digits_train_split()
    async with Client(build_server(Settings.from_env(home))) as client:
        versions = []
        for seed, major in enumerate(({0, 1, 2, 3, 4}, {5, 6, 7, 8, 9})):
            cid = await trained_cluster(client, skewed_half(X, y, major, 0.05, seed), epochs=6, learning_rate=0.003)
            versions.append((await ok(client, "neural_model_register", {"source": cid, "name": "sites"}))["version"])
            await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
        fused = await ok(client, "neural_model_fuse", {"name": "sites", "versions": versions, "method": "ensemble"})
        assert fused["version"] == "1.2.0" and fused["manifest"]["kind"] == "ensemble"
        assert [p["version"] for p in fused["manifest"]["parents"]] == versions
        serving = (await ok(client, "neural_cluster_init", {"name": "serving", "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": serving, "count": 2})
        acc = {}
        for version in (*versions, fused["version"]):
            report = (await ok(client, "neural_model_evaluate", {"name": "sites", "version": version,
                                                                 "dataset": "digits", "cluster_id": serving}))["report"]
            acc[version] = report["accuracy"]
            if version == "1.2.0":
                fused_parameters = report["parameters"]
        assert acc["1.2.0"] >= max(acc["1.0.0"], acc["1.1.0"]) + 0.05, acc
        pred = await ok(client, "neural_predict_distributed",
                        {"cluster_id": serving, "input_data": json.dumps(X[:2].tolist())})
        assert pred["release"] == "sites@1.2.0" and pred["nodes_used"] == 2
        first = await ok(client, "neural_model_promote", {"name": "sites", "version": "1.2.0",
                                                           "gates": {"min_accuracy": 0.9}})
        assert first["promoted"] and first["gates"][0]["threshold"] == 0.9, first

        # Distillation: one student trained through a cluster on the ensemble's answers keeps >= 95% of its accuracy.
        student = await ok(client, "neural_model_fuse", {"name": "sites", "versions": versions, "method": "distill",
                                                         "dataset": "digits"})
        assert student["version"] == "1.3.0" and student["manifest"]["kind"] == "distilled"
        assert [p["version"] for p in student["manifest"]["teacher"]["parents"]] == versions
        assert student["manifest"]["transfer_set"]["examples"] == 1438
        assert student["manifest"]["student"]["final_metrics"]
        report = (await ok(client, "neural_model_evaluate", {"name": "sites", "version": "1.3.0", "dataset": "digits",
                                                             "cluster_id": serving}))["report"]
        assert report["accuracy"] >= 0.95 * acc["1.2.0"], (report["accuracy"], acc)
        assert report["parameters"] * 2 == fused_parameters  # one model where the ensemble serves two
