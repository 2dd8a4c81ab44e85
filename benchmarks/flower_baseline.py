"""Flower baseline for the federated row of ``benchmarks/run.py``: FedAvg in Flower's
Simulation Engine (``flwr.simulation.run_simulation``, Ray backend) on the same data split and
model as a federated run through the server.

Run it with the python of a side virtual environment that has Flower (its ``[simulation]``
extra pins ray 2.55.1, which cannot share an environment with this project's ray extra):

    python3 -m venv /work/flwr-venv
    /work/flwr-venv/bin/pip install torch==2.13.0 'flwr[simulation]==1.41.0' scikit-learn
    /work/flwr-venv/bin/python benchmarks/flower_baseline.py --clients 4 --rounds 5

What runs: ``--clients`` SuperNodes; client ``i`` holds shard ``i`` of the seeded train split
that the node trainer makes (``workers.data.train_val_split`` + IID ``partition``) and its
part of the validation split; the model is ``workers.models.build_model`` (``mlp``/``custom``
with ``--layers``, 64-64-10 on digits by default) with the same initial weights (seeded). Each
round every client trains ``--local-epochs`` over its shard (batch ``--batch-size``, Adam) and
then evaluates the new global model on its validation part, like the server's federated mode.
With ``--dp-noise-multiplier`` and ``--dp-clipping-norm`` the run is Flower's central DP with
client-side fixed clipping (``DifferentialPrivacyClientSideFixedClipping`` around FedAvg, and
``fixedclipping_mod`` on the clients): each client clips its update, the server adds Gaussian
noise of std ``noise_multiplier x clipping_norm / clients`` to the mean -- the mechanism of the
server's ``differential_privacy: {mode: "central"}``.
The script imports this repository's ``workers`` package (numpy, torch and pydantic only).

Prints, as its last stdout line, ``FLOWER_BASELINE_JSON {...}`` with the wall time of the
``run_simulation`` call, the time from interpreter start, and the final metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Ray's worker processes import `workers` too: they inherit the environment of this driver.
os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)

DEFAULT_LAYERS = [{"type": "dense", "units": 64}, {"type": "output"}]


def client_data(cfg: dict, index: int):  # type: ignore[no-untyped-def]
    """(train X, train y, val X, val y, task) of client ``index``, as read_local splits it."""
    import numpy as np
    import torch

    from workers.data import load_dataset, partition, train_val_split
    from workers.models import TaskInfo

    ds = load_dataset(cfg["dataset"])
    n_parts, seed = cfg["clients"], cfg["seed"]
    tr, va = train_val_split(len(ds), cfg["validation_split"], seed, stratify=ds.y)
    parts = partition(ds.y[tr], n_parts, "iid", 0.5, seed)
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919]).permutation(len(va))
    val_idx = va[np.sort(np.array_split(perm, n_parts)[index])]
    tr_idx = tr[parts[index]]

    def t(idx):  # type: ignore[no-untyped-def]
        return (torch.from_numpy(np.ascontiguousarray(ds.X[idx], dtype=np.float32)),
                torch.from_numpy(np.asarray(ds.y[idx], dtype=np.int64)))

    task = TaskInfo(ds.kind, tuple(ds.input_shape), len(ds.label_names))
    return (*t(tr_idx), *t(val_idx), task)


def make_model(cfg: dict, task):  # type: ignore[no-untyped-def]
    import torch

    from workers.models import build_model

    torch.manual_seed(cfg["seed"])
    return build_model(cfg["architecture"], cfg["preset"], task,
                       layers=cfg["layers"] if cfg["preset"] == "custom" else None)


def parse_config() -> tuple[argparse.Namespace, dict]:
    """The command line, and the run's config as the client and server apps read it."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--architecture", default="mlp")
    ap.add_argument("--preset", default="custom")
    ap.add_argument("--layers", default=json.dumps(DEFAULT_LAYERS), help="JSON layer list for preset custom")
    ap.add_argument("--validation-split", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus-per-client", type=float, default=1.0)
    ap.add_argument("--dp-noise-multiplier", type=float, default=None, help="central DP (client-side clipping)")
    ap.add_argument("--dp-clipping-norm", type=float, default=None, help="central DP: L2 bound of each update")
    args = ap.parse_args()
    cfg = {"clients": args.clients, "rounds": args.rounds, "local_epochs": args.local_epochs,
           "batch_size": args.batch_size, "lr": args.lr, "dataset": args.dataset,
           "architecture": args.architecture, "preset": args.preset, "layers": json.loads(args.layers),
           "validation_split": args.validation_split, "seed": args.seed,
           "dp_noise_multiplier": args.dp_noise_multiplier, "dp_clipping_norm": args.dp_clipping_norm}
    if (cfg["dp_noise_multiplier"] is None) != (cfg["dp_clipping_norm"] is None):
        ap.error("--dp-noise-multiplier and --dp-clipping-norm go together")
    return args, cfg


def build_client_app(cfg: dict):  # type: ignore[no-untyped-def]
    """A ClientApp whose train step runs the local epochs on client ``partition-id``'s shard and
    whose evaluate step scores the global model on that client's validation part."""
    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod

    # the mod clips the update (new weights minus the global ones) to the norm the DP wrapper sends
    client_app = ClientApp(mods=[fixedclipping_mod] if cfg["dp_noise_multiplier"] is not None else [])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        import numpy as np

        torch.set_num_threads(1)
        index = int(context.node_config["partition-id"])
        X, y, _, _, task = client_data(cfg, index)
        model = make_model(cfg, task)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.train()
        rnd = int(msg.content["config"]["server-round"])
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        B = cfg["batch_size"]
        spe = len(X) // B
        loss_sum = 0.0
        for le in range(cfg["local_epochs"]):
            order = np.random.default_rng([cfg["seed"], rnd * 10_000 + le, index]).permutation(len(X))
            for s in range(spe):
                idx = torch.from_numpy(order[s * B:(s + 1) * B])
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(X[idx]), y[idx])
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach())
        metrics = MetricRecord({"train_loss": loss_sum / max(1, spe * cfg["local_epochs"]), "num-examples": len(X)})
        return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                       reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        index = int(context.node_config["partition-id"])
        _, _, Xv, yv, task = client_data(cfg, index)
        model = make_model(cfg, task)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            logits = model(Xv)
            loss = float(F.cross_entropy(logits, yv))
            acc = float((logits.argmax(1) == yv).float().mean())
        metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(Xv)})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return client_app


def build_server_app(cfg: dict, out: dict):  # type: ignore[no-untyped-def]
    """A ServerApp running FedAvg over all clients for ``cfg["rounds"]``; it puts the last
    round's client-side evaluation into ``out``."""
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        _, _, _, _, task = client_data(cfg, 0)
        model = make_model(cfg, task)
        n = cfg["clients"]
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                          min_available_nodes=n)
        if cfg["dp_noise_multiplier"] is not None:
            strategy = DifferentialPrivacyClientSideFixedClipping(
                strategy, noise_multiplier=cfg["dp_noise_multiplier"], clipping_norm=cfg["dp_clipping_norm"],
                num_sampled_clients=n)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                                num_rounds=cfg["rounds"], train_config=ConfigRecord({"lr": cfg["lr"]}))
        ev = result.evaluate_metrics_clientapp
        if ev:
            last = ev[max(ev)]
            out["final_eval"] = {k: float(v) for k, v in last.items()}
        out["rounds_evaluated"] = len(ev or {})

    return server_app


def main() -> int:
    args, cfg = parse_config()

    # Imported after parsing the arguments and timed as imports_s; the app builders reuse them.
    import flwr
    import flwr.app
    import flwr.clientapp
    import flwr.serverapp
    import flwr.serverapp.strategy
    import torch
    from flwr.simulation import run_simulation

    t_imported = time.perf_counter()
    client_app = build_client_app(cfg)
    out: dict = {}
    server_app = build_server_app(cfg, out)

    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}})
    run_s = time.perf_counter() - t0

    result = {"flwr": flwr.__version__, "torch": torch.__version__, "clients": args.clients, "rounds": args.rounds,
              "local_epochs": args.local_epochs, "run_simulation_s": run_s,
              "imports_s": t_imported - T_START, "script_s": time.perf_counter() - T_START, **out,
              "config": {k: v for k, v in cfg.items() if k != "layers"}, "layers": cfg["layers"]}
    sys.stdout.write("FLOWER_BASELINE_JSON " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0

if __name__ == "__main__":
    sys.exit(main())
