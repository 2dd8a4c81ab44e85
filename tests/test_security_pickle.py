"""Nothing a client can place or name is ever unpickled (issue 11, finding 1), checkpoints are
safetensors that resume exactly, count toward the sandbox quota (finding 6) and are recorded
with their own epoch (finding 10).

Every malicious file here is a pickle whose ``__reduce__`` creates a marker file when it is
unpickled: each route must refuse it with a sentence, and the marker must never appear.
"""

from __future__ import annotations

import base64
import json
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import err, ok
from mcp import Client

from flow_nexus_server.cli import main as cli_main
from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service.training import LiveSession, NodeView, TrainingService
from flow_nexus_server.store import Cluster, Node, Store, TrainingSession
from workers import protocol as p
from workers.models import TaskInfo, build_model
from workers.serving import ServingError, export_model, load_any, load_export
from workers.training.checkpoint import (
    SandboxQuota,
    checkpoint_payload,
    convert_legacy,
    read_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from workers.training.common import TrainedModel, TrainingError
from workers.training.progress import ProgressSink

TASK = TaskInfo(kind="vectors", input_shape=(4,), num_classes=3)


class Evil:
    """Unpickling this opens ``marker`` for writing: the file appearing proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _job(session: str = "s1", **kw) -> p.TrainJob:
    return p.TrainJob(session_id=session, mode="sync", topology="mesh", dataset="digits", architecture="mlp",
                      roles=["worker"], **kw)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", "base", TASK)


def _legacy_checkpoint(path: Path, extra: dict | None = None) -> None:
    """A checkpoint the way this server wrote them before (torch.save of the dict)."""
    model = _model()
    payload = checkpoint_payload(_job(), 3, model, None, TASK, None, ["a", "b", "c"], 0, {"val_accuracy": 0.5})
    torch.save({**payload, **(extra or {})}, path)


def _evil_checkpoint(path: Path, marker: Path) -> None:
    _legacy_checkpoint(path, {"metrics": {"val_accuracy": Evil(marker)}})


def _refused_pickle(message: str) -> None:
    assert "pickle" in message and "arbitrary code" in message and "convert-checkpoint" in message, message


# --------------------------------------------------------------------------- model load and resume (unit)


def test_pickled_checkpoints_are_refused_by_load_and_resume(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "upload.pt"
    _evil_checkpoint(evil, marker)
    raw = tmp_path / "raw.pt"  # a plain pickle, not torch's zip format
    raw.write_bytes(pickle.dumps({"model_state": {}, "task": Evil(marker)}))
    for path in (evil, raw):
        with pytest.raises(TrainingError) as load:
            load_any(path)  # neural_model_load of a file
        _refused_pickle(str(load.value))
        with pytest.raises(TrainingError) as resume:
            read_checkpoint(resolve_resume(path.name, tmp_path))  # resume_from, sandbox-relative
        _refused_pickle(str(resume.value))
    assert not marker.exists()


def test_pickle_named_safetensors_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    _evil_checkpoint(evil, marker)
    disguised = tmp_path / "ckpt-x-e001.safetensors"
    disguised.write_bytes(evil.read_bytes())
    with pytest.raises(TrainingError, match="not a valid safetensors file"):
        load_any(disguised)
    assert not marker.exists()


def test_foreign_safetensors_files_are_refused_with_a_sentence(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(TrainingError, match="not a training checkpoint of this server"):
        load_any(plain)
    odd = tmp_path / "odd.safetensors"
    fields = {"task": {"kind": "vectors"}, "job": {"architecture": "mlp"}}
    save_file({"w": torch.zeros(2)}, str(odd),
              metadata={"flow_nexus": json.dumps({"format_version": 1, "model_keys": [], "fields": fields})})
    with pytest.raises(TrainingError, match="not one this server writes"):
        load_any(odd)


def test_raft_replica_files_are_read_without_pickle(tmp_path: Path) -> None:
    """A planted raft file is read through the same reader as any checkpoint (the takeover's resume_from)."""
    marker = tmp_path / "PWNED"
    raft = tmp_path / "raft"
    raft.mkdir()
    evil = tmp_path / "evil.pt"
    _evil_checkpoint(evil, marker)
    for name in ("committed.safetensors", "pending.safetensors", "committed.pt"):
        (raft / name).write_bytes(evil.read_bytes())
        with pytest.raises(TrainingError) as exc:
            read_checkpoint(resolve_resume(f"raft/{name}", tmp_path))
        assert "safetensors" in str(exc.value) or "pickle" in str(exc.value)
    assert not marker.exists()


def test_weights_only_legacy_checkpoint_still_loads(tmp_path: Path) -> None:
    """An old checkpoint of plain tensors and containers is read by torch's restricted unpickler."""
    old = tmp_path / "ckpt-s1-e003.pt"
    _legacy_checkpoint(old)
    trained, job = load_any(old)
    assert trained.epoch == 3 and trained.label_names == ["a", "b", "c"] and job["session_id"] == "s1"


def test_convert_checkpoint_cli_converts_a_trusted_legacy_file(tmp_path: Path, capsys) -> None:
    import numpy as np

    old = tmp_path / "ckpt-s1-e003.pt"
    _legacy_checkpoint(old, {"metrics": {"val_accuracy": np.float64(0.75)}})  # numpy: needs full pickle
    with pytest.raises(TrainingError) as refused:
        read_checkpoint(old)
    _refused_pickle(str(refused.value))
    assert str(old) in str(refused.value)

    assert cli_main(["convert-checkpoint", str(old)]) == 0
    new = tmp_path / "ckpt-s1-e003.safetensors"
    assert f"wrote {new}" in capsys.readouterr().out
    ck = read_checkpoint(new)
    assert ck["epoch"] == 3 and ck["metrics"] == {"val_accuracy": 0.75} and ck["label_names"] == ["a", "b", "c"]
    model = _model()
    torch.manual_seed(1)
    model.load_state_dict(ck["model_state"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model().state_dict().values()))
    # an explicit target, and a refusal for a wrong suffix
    assert convert_legacy(old, tmp_path / "other.safetensors").exists()
    assert cli_main(["convert-checkpoint", str(old), str(tmp_path / "x.pt")]) == 1
    assert "must be named *.safetensors" in capsys.readouterr().err


# --------------------------------------------------------------------------- exports


def _export(tmp_path: Path, fmt: str = "safetensors") -> Path:
    model = _model().eval()
    trained = TrainedModel(model=model, task=TASK, tokenizer=None, label_names=["a", "b", "c"], architecture="mlp",
                           preset="base", max_len=0)
    directory = tmp_path / f"export-{fmt}"
    export_model(trained, directory, fmt, {}, {"session_id": "s1"})
    return directory


def _set_weights(directory: Path, **changes) -> None:
    cfg = directory / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))


def test_export_weights_must_be_a_safetensors_file_inside_the_export(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = outside / "evil.pt"
    _evil_checkpoint(evil, marker)
    directory = _export(tmp_path)
    (directory / "inside.pt").write_bytes(evil.read_bytes())
    (outside / "evil.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    (directory / "link.safetensors").symlink_to(outside / "evil.safetensors")
    names = ["../outside/evil.pt", str(evil), "inside.pt", "../outside/evil.safetensors",
             str(outside / "evil.safetensors"), "link.safetensors", "missing.safetensors", "..", "", None, 7]
    for name in names:
        _set_weights(directory, weights=name)
        with pytest.raises(ServingError) as exc:
            load_any(directory)
        assert "config.json" in str(exc.value) and "inside the export directory" in str(exc.value), name
    assert not marker.exists()
    _set_weights(directory, weights="model.safetensors")
    trained, job = load_export(directory)
    assert trained.label_names == ["a", "b", "c"] and job["session_id"] == "s1"


def test_torchscript_export_loads_from_safetensors_and_never_runs_torchscript(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    directory = _export(tmp_path, "torchscript")
    assert {"model.safetensors", "model.torchscript.pt"} <= {f.name for f in directory.iterdir()}
    # whatever the TorchScript file holds, loading reads the safetensors weights only
    _evil_checkpoint(directory / "model.torchscript.pt", marker)
    trained, _ = load_any(directory)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(trained.model(x), _model().eval()(x))
    # an export holding TorchScript only (older versions wrote those) is refused
    (directory / "model.safetensors").unlink()
    _set_weights(directory, weights="model.torchscript.pt")
    with pytest.raises(ServingError, match="holds only TorchScript weights.*Export the model again"):
        load_any(directory)
    assert not marker.exists()


# --------------------------------------------------------------------------- format, resume and quota


def test_checkpoint_is_one_safetensors_file_and_optimizer_state_round_trips(tmp_path: Path) -> None:
    from safetensors import safe_open

    for name, make in (("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3)),
                       ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))):
        model = _model()
        opt = make(model.parameters())
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
        job = _job(f"rt-{name}", optimizer=name)
        path, _ = save_checkpoint(tmp_path, job, 7, model, opt, TASK, None, ["a", "b", "c"], 0, {"loss": 1.5})
        assert path.name == f"ckpt-rt-{name}-e007.safetensors"
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            assert "flow_nexus" in f.metadata()
        assert {k.split(".")[0] for k in keys} == {"model", "optim"}
        ck = read_checkpoint(path)
        assert ck["epoch"] == 7 and ck["job"]["optimizer"] == name and ck["metrics"] == {"loss": 1.5}
        assert list(ck["model_state"]) == list(model.state_dict())
        fresh = make(model.parameters())
        fresh.load_state_dict(ck["optimizer_state"])
        want, got = opt.state_dict(), fresh.state_dict()
        assert got["param_groups"] == want["param_groups"] and set(got["state"]) == set(want["state"])
        for i, state in want["state"].items():
            for k, v in state.items():
                assert torch.equal(got["state"][i][k], v), (name, i, k)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.pt"))


def test_checkpoint_over_the_sandbox_quota_fails_with_a_sentence(tmp_path: Path) -> None:
    sandbox = tmp_path / "node_q"
    (sandbox / "checkpoints").mkdir(parents=True)
    (sandbox / "data.csv").write_bytes(b"x" * 10_000)
    model = _model()
    quota = SandboxQuota("node_q", sandbox, 20_000)
    with pytest.raises(TrainingError) as exc:
        save_checkpoint(sandbox / "checkpoints", _job(), 1, model, None, TASK, None, ["a"], 0, {}, quota)
    msg = str(exc.value)
    assert "node node_q's sandbox" in msg and "over its limit of 20000 (FLOW_NEXUS_MAX_SANDBOX_BYTES)" in msg
    assert "checkpoint_every/max_checkpoints" in msg
    assert list((sandbox / "checkpoints").iterdir()) == []  # nothing written, not even a temporary file
    # a checkpoint_dir outside the sandbox is not this quota's business; a roomy quota writes
    outside = tmp_path / "elsewhere"
    path, _ = save_checkpoint(outside, _job(), 1, model, None, TASK, None, ["a"], 0, {}, quota)
    assert path.exists()
    roomy = SandboxQuota("node_q", sandbox, 10 << 20)
    path, _ = save_checkpoint(sandbox / "checkpoints", _job(), 1, model, None, TASK, None, ["a"], 0, {}, roomy)
    assert path.exists()


# --------------------------------------------------------------------------- finding 10


def _one_node_session(tmp_path: Path) -> tuple[TrainingService, LiveSession, list[dict]]:
    """A TrainingService over a real store following session s1 on node n1; the events it emits."""
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    with store.session() as s:
        s.add(Cluster(id="c1", name="c", status="training", topology="mesh", architecture="mlp",
                      consensus="proof-of-learning", launcher="subprocess", backend="gloo", max_nodes=1,
                      auto_healing=False, token="t", directory=str(tmp_path)))
        s.add(TrainingSession(id="s1", cluster_id="c1", status="running", config={}))
    events: list[dict] = []
    clusters = SimpleNamespace(
        store=store, telemetry=SimpleNamespace(), on_node_lost=[], on_training_membership=[], on_training_leave=[],
        settings=SimpleNamespace(home=tmp_path),
        event=lambda cid, kind, msg, **kw: events.append(kw.get("data") or {}))
    service = TrainingService(clusters)  # type: ignore[arg-type]
    node = Node(id="n1", cluster_id="c1", seq=0, role="worker", status="running", model="base", capabilities=[],
                sandbox=str(tmp_path))
    return service, LiveSession("s1", "c1", "sync", time.time(), [NodeView(node)]), events


def test_each_checkpoint_is_recorded_with_its_own_epoch(tmp_path: Path) -> None:
    """One push that brings e056, e058 and e060 (the node already at epoch 60) records 56, 58 and 60."""
    service, live, events = _one_node_session(tmp_path)
    paths = [str(tmp_path / f"ckpt-s1-e{e:03d}.safetensors") for e in (56, 58, 60)]
    snap = p.TrainProgress(session_id="s1", state="running", epoch=60, checkpoints=paths)
    service._apply_progress(live, live.nodes[0], snap)
    status = service.status("s1")
    assert sorted((c.path, c.epoch) for c in status.checkpoints) == list(zip(paths, [56, 58, 60]))
    assert [e["epoch"] for e in events] == [56, 58, 60]


def test_a_checkpoint_rotated_away_between_two_pushes_is_still_recorded(tmp_path: Path) -> None:
    """max_checkpoints=1 and an improvement every epoch, faster than the 1 s pushes: e001 is written
    and rotated away before any push. It is recorded (as deleted), not lost (the #15 bug)."""
    service, live, events = _one_node_session(tmp_path)
    sink = ProgressSink("s1", "worker")
    files = [tmp_path / f"ckpt-s1-e{e:03d}.safetensors" for e in (1, 2, 3)]

    def write(epoch: int) -> None:  # what Runtime.write_checkpoint does with rotation
        files[epoch - 1].write_bytes(b"x")
        if epoch > 1:
            files[epoch - 2].unlink()
            sink.discard_checkpoint(str(files[epoch - 2]))
        sink.add_checkpoint(str(files[epoch - 1]))

    write(1)
    write(2)
    service._apply_progress(live, live.nodes[0], sink.snapshot())  # one push after two epochs
    write(3)
    service._apply_progress(live, live.nodes[0], sink.snapshot())
    service._apply_progress(live, live.nodes[0], sink.snapshot())  # an unchanged push records nothing more
    status = service.status("s1")
    assert sorted((c.epoch, c.deleted) for c in status.checkpoints) == [(1, True), (2, True), (3, False)]
    assert [e["epoch"] for e in events] == [1, 2, 3]


# --------------------------------------------------------------------------- end to end



@pytest.mark.anyio
async def test_uploaded_pickle_is_refused_by_model_load_and_resume(home, tmp_path, monkeypatch):
    """Through the tools: upload a malicious .pt, name it in neural_model_load and in resume_from."""
    # 200 kB: room for the upload, not for a checkpoint of the digits MLP with Adam (about 310 kB)
    monkeypatch.setenv("FLOW_NEXUS_MAX_SANDBOX_BYTES", "200000")
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    _evil_checkpoint(evil, marker)
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "pickle", "architecture": "mlp"}))["cluster_id"]
        node = (await ok(client, "neural_node_deploy", {"cluster_id": cid}))["node_id"]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        up = await ok(client, "neural_node_upload", {"node_id": node, "file_name": "model.pt", "encoding": "base64",
                                                     "content": base64.b64encode(evil.read_bytes()).decode()})
        text = await err(client, "neural_model_load", {"cluster_id": cid, "path": up["path"]})
        _refused_pickle(text)
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 2,
                                                           "resume_from": up["path"], "wait": True})
        assert run["status"] == "failed"
        _refused_pickle(run["result"]["error"])
        assert not marker.exists()

        # The same node trains, but its final checkpoint would pass the sandbox quota: a sentence.
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})  # a failed session leaves it to re-form
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 1,
                                                           "wait": True})
        assert run["status"] == "failed", run
        error = run["result"]["error"]
        assert f"node {node}'s sandbox" in error and "over its limit of 200000 (FLOW_NEXUS_MAX_SANDBOX_BYTES)" in error
        sandbox = Path(up["path"]).parent
        assert not list(sandbox.rglob("ckpt-*"))
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
    assert not marker.exists()
