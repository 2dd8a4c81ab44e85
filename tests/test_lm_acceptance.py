"""Acceptance of the language model: the BBC language-model template, as a user deploys it
(2 workers, its recipe: 3 epochs of bbc-news-lm), reaches a validation perplexity of at most
half the unigram baseline of the same tokenizer. Minutes on two CPU cores: marked slow/lmslow and
run only when asked for: ``python -m pytest -m lmslow tests/test_lm_acceptance.py``."""

from __future__ import annotations

import pytest
from conftest import ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.lmslow]


@pytest.fixture(autouse=True)
def _only_when_asked(request: pytest.FixtureRequest) -> None:
    if "lmslow" not in (request.config.getoption("-m") or ""):
        pytest.skip("language-model acceptance run (about 15 min on 2 CPU cores): pytest -m lmslow")


async def test_bbc_language_model_template_halves_the_unigram_perplexity(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        built = await ok(client, "neural_deploy_template", {"template_id": "bbc-language-model"})
        recipe = built["suggested_training"]
        assert recipe["dataset"] == "bbc-news-lm" and recipe["epochs"] == 3
        run = await ok(client, "neural_train_distributed", {**recipe, "wait": True, "wait_timeout_s": 3600})
        assert run["status"] == "completed", run
        metrics = run["result"]["metrics"]
        print({k: metrics[k] for k in ("val_perplexity", "baseline_perplexity", "tokens_per_s")})
        assert metrics["val_perplexity"] <= 0.5 * metrics["baseline_perplexity"], metrics
        assert metrics["tokens_per_s"] > 0
        await ok(client, "neural_cluster_terminate", {"cluster_id": built["cluster_id"]})
