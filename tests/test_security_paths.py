"""Paths a client names: globs cannot escape the roots, sandbox writes follow no symlink.

Issue 11, findings 3 (glob escape), 4 (upload through a planted symlink, server half) and 8
(a long upload name): each repro through the in-memory MCP client on one connected cluster.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import err, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from flow_nexus_server.service.errors import ServiceError
from flow_nexus_server.service.paths import check_dataset_spec, under_allowed_root

pytestmark = pytest.mark.anyio

SECRET_ROWS = "f1,f2,label\n" + "".join(f"{i},{i % 3},SECRET_LABEL_{i % 2}\n" for i in range(40))


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory):
    """One connected cluster with one worker; an `outside` directory beside the state home."""
    base = tmp_path_factory.mktemp("paths")
    home, outside = base / "home", base / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text(SECRET_ROWS)
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "paths", "architecture": "mlp"}))["cluster_id"]
        node = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker"}))["node_id"]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        sandbox = home / "clusters" / cid / "nodes" / node
        yield {"client": client, "cid": cid, "node": node, "home": home, "outside": outside, "sandbox": sandbox}
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def sessions(env) -> int:
    status = await ok(env["client"], "neural_cluster_status", {"cluster_id": env["cid"]})
    return status["features"]["training_sessions"]


# ------------------------------------------------------------------------ finding 3: globs

async def test_glob_with_dot_dot_after_a_wildcard_cannot_read_outside(cluster):
    home, secret = cluster["home"], cluster["outside"] / "secret.csv"
    text = await err(cluster["client"], "neural_train_distributed",
                     {"cluster_id": cluster["cid"], "dataset": f"{home}/*/../../outside/secret.csv", "epochs": 1})
    assert str(secret) in text and "outside the allowed roots" in text, text
    assert "SECRET_LABEL" not in text
    assert await sessions(cluster) == 0


async def test_glob_matching_a_symlink_out_of_the_roots_is_refused(cluster):
    home, secret = cluster["home"], cluster["outside"] / "secret.csv"
    data = home / "data"
    data.mkdir(exist_ok=True)
    (data / "mine.csv").write_text("f1,label\n1,a\n2,b\n")
    (data / "zz-link.csv").symlink_to(secret)
    for spec in (f"{data}/*.csv", f"{home}/**/*.csv", str(data), str(data / "zz-link.csv")):
        text = await err(cluster["client"], "neural_train_distributed",
                         {"cluster_id": cluster["cid"], "dataset": spec, "epochs": 1})
        assert str(secret) in text and "outside the allowed roots" in text, (spec, text)
    assert await sessions(cluster) == 0


async def test_dot_dot_in_an_absolute_dataset_path_is_refused_even_without_a_match(cluster):
    home = cluster["home"]
    text = await err(cluster["client"], "neural_train_distributed",
                     {"cluster_id": cluster["cid"], "dataset": f"{home}/clusters/../nothing-*.csv", "epochs": 1})
    assert "'..'" in text, text


async def test_the_servers_own_files_are_not_datasets(cluster):
    home = cluster["home"]
    (home / "server.log").touch()  # the in-memory server logs to no file; the CLI one does
    for spec in (str(home / "state.db"), f"{home}/state.db*", f"{home}/server.log*"):
        text = await err(cluster["client"], "neural_train_distributed",
                         {"cluster_id": cluster["cid"], "dataset": spec, "epochs": 1})
        assert "server's own files" in text, (spec, text)
    assert await sessions(cluster) == 0


def test_state_files_refused_wherever_a_path_is_named(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for name in ("state.db", "state.db-wal", "server.log", "server.log.1"):
        with pytest.raises(ServiceError, match="server's own files"):
            under_allowed_root(str(home / name), [home], "destination")
    assert under_allowed_root(str(home / "exports"), [home], "destination") == home / "exports"


def test_a_glob_matching_too_many_files_is_refused(tmp_path, monkeypatch):
    import flow_nexus_server.service.paths as paths

    monkeypatch.setattr(paths, "MAX_GLOB_MATCHES", 3)
    for i in range(5):
        (tmp_path / f"{i}.csv").write_text("x,label\n1,a\n")
    with pytest.raises(ServiceError, match="more than 3 files"):
        check_dataset_spec(f"{tmp_path}/*.csv", [tmp_path], 1 << 20)
    check_dataset_spec(f"{tmp_path}/[0-2].csv", [tmp_path], 1 << 20)


# ------------------------------------------------------------- finding 4: sandbox symlinks

async def test_upload_does_not_write_through_a_planted_part_symlink(cluster):
    sandbox, victim = cluster["sandbox"], cluster["outside"] / "victim.txt"
    victim.write_text("untouched")
    (sandbox / "x.part").symlink_to(victim)
    reply = await ok(cluster["client"], "neural_node_upload",
                     {"node_id": cluster["node"], "file_name": "x", "content": "mine"})
    assert reply["relative_path"] == "x"
    assert victim.read_text() == "untouched"
    assert (sandbox / "x").read_text() == "mine" and not (sandbox / "x").is_symlink()
    assert stat.S_IMODE(os.lstat(sandbox / "x").st_mode) == 0o600


async def test_upload_into_a_symlinked_directory_is_refused(cluster):
    sandbox, outside = cluster["sandbox"], cluster["outside"]
    target = outside / "target-dir"
    target.mkdir()
    (sandbox / "data").symlink_to(target)
    text = await err(cluster["client"], "neural_node_upload",
                     {"node_id": cluster["node"], "file_name": "data/y.csv", "content": "a,b\n"})
    assert "sandbox" in text, text
    # A symlink that stays inside the sandbox is not followed either.
    (sandbox / "inner-real").mkdir()
    (sandbox / "inner").symlink_to(sandbox / "inner-real")
    text = await err(cluster["client"], "neural_node_upload",
                     {"node_id": cluster["node"], "file_name": "inner/z.csv", "content": "a,b\n"})
    assert "'inner'" in text and "symlink" in text, text
    assert list(target.iterdir()) == [] and list((sandbox / "inner-real").iterdir()) == []
    # A name that is a symlink out of the sandbox is refused; one inside is replaced, its target kept.
    victim = outside / "victim2.txt"
    victim.write_text("untouched")
    (sandbox / "inner-real" / "w.csv").symlink_to(victim)
    text = await err(cluster["client"], "neural_node_upload",
                     {"node_id": cluster["node"], "file_name": "inner-real/w.csv", "content": "new"})
    assert "leads outside the node's sandbox" in text and victim.read_text() == "untouched", text
    kept = sandbox / "inner-real" / "kept.csv"
    kept.write_text("kept")
    (sandbox / "inner-real" / "v.csv").symlink_to(kept)
    await ok(cluster["client"], "neural_node_upload",
             {"node_id": cluster["node"], "file_name": "inner-real/v.csv", "content": "new"})
    assert kept.read_text() == "kept" and not (sandbox / "inner-real" / "v.csv").is_symlink()
    assert (sandbox / "inner-real" / "v.csv").read_text() == "new"
    assert not [p for p in Path(sandbox).rglob("*.part") if p.name != "x.part"]  # no temp file left


# ------------------------------------------------------------- finding 8: upload name length

async def test_long_upload_names(cluster):
    for length in (250, 255):
        name = "n" * length
        reply = await ok(cluster["client"], "neural_node_upload",
                         {"node_id": cluster["node"], "file_name": name, "content": "ok"})
        assert reply["bytes"] == 2 and (cluster["sandbox"] / name).read_text() == "ok"
    wide = "é" * 200  # 200 characters, 400 bytes
    text = await err(cluster["client"], "neural_node_upload",
                     {"node_id": cluster["node"], "file_name": f"data2/{wide}", "content": "x"})
    assert "too long" in text and "400 bytes" in text and "255 bytes per path component" in text, text
    assert not (cluster["sandbox"] / "data2").exists()
