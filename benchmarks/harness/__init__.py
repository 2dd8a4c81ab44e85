"""The harness behind ``flow-nexus-server bench``: the real server against plain baselines, side by side.

Drives the real MCP server through the in-memory SDK client (``Client(build_server(...))``),
with real node processes, and runs each baseline in the same invocation, then prints one
table (ratios are ours / theirs) and writes every figure to JSON. Rows (``--only`` names), by module:

* ``deploy``    (deploy.py) 4 nodes to healthy: warm launcher (ours, the server's default) vs one
                cold ``python -m workers.agent`` per node (the launch every plain launcher pays).
* ``sync``      (sync.py) synchronous step time, 2 workers (mesh) vs ``benchmarks/ddp_baseline.py``
                under torchrun: same model, data shard, batch, optimizer, step count and timer bounds.
* ``bytes``     (sync.py) bytes sent per node per optimizer step for each topology (the nodes' counters).
* ``allreduce`` (sync.py) mesh all-reduce bandwidth inside our nodes (``neural_performance_benchmark``)
                vs ``benchmarks/gloo_baseline.py`` (bare gloo all_reduce under torchrun).
* ``federated`` (federated.py) FedAvg 4 clients x 5 rounds on digits, 64-64-10 MLP: our train call
                vs Flower's simulation engine (``benchmarks/flower_baseline.py`` in a side venv).
* ``byzantine`` (federated.py) accuracy with one worker sending noisy weights: robust rules vs plain FedAvg.
* ``privacy`` (privacy.py) accuracy and round time with local DP (epsilon 3, opacus) and with secure
  aggregation, beside plain FedAvg (a Flower DP baseline is not wired in: that line is skipped).
* ``predict``   (serving.py) client-measured single-example ``neural_predict_distributed`` through
                1, 2, 4 nodes.
* ``status``    (status.py) ``neural_cluster_status`` latency on a 4-node cluster while it trains
                (in-memory client and the SDK stdio client).
* ``memory``    (serving.py) peak RSS per node (``neural_performance_benchmark`` memory figures).
* ``architectures`` (architectures.py) each architecture on each built-in classification dataset through
                a 2-worker cluster, beside its twin trained on one process and a reference model
                (central.py); only with ``--only architectures`` (it trains for about an hour).

A figure that could not be measured is reported with the reason, never estimated. The harness
is a command-line program (main.py): it writes its table to stdout and its progress to stderr.
"""
