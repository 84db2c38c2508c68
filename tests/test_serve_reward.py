"""/v1/score: a reward-model folder is served with the normalised rewards of alignloop's RewardModel."""

from __future__ import annotations

import httpx
import pytest
import torch

from alignloop.models.export import export_model
from alignloop.models.load import read_meta
from alignloop.models.reward import RewardModel, encode_for_reward, head_scores
from alignloop.rl.rewards import RemoteReward
from alignloop.serve.app import create_app
from alignloop.serve.backends import build_server
from alignloop.serve.server import serve_in_thread

PAIRS = [{"prompt": "Repeat twice: red cat\n", "response": "red cat red cat"},
         {"prompt": "Repeat twice: big dog\n", "response": "small"},
         {"prompt": "Say something", "response": "happy sad tree river stone bird"},
         {"prompt": [{"role": "user", "content": "Repeat twice: dog"}], "response": "dog dog"}]


def test_score_endpoint_returns_the_reward_models_normalised_scores(reward_dir):
    reference = RewardModel.load(reward_dir, device="cpu")
    norm = read_meta(reward_dir)["normalization"]
    prompts, responses = [p["prompt"] for p in PAIRS], [p["response"] for p in PAIRS]
    want = reference.score(prompts, responses)
    seqs = [encode_for_reward(reference.tokenizer, p, r, 256)[0] for p, r in zip(prompts, responses, strict=True)]
    raw = head_scores(reference.model, seqs, reference.tokenizer.pad_token_id, 8)[:, 0]
    torch.testing.assert_close(torch.tensor(want), (raw - norm["mean"]) / norm["std"])  # normalised, not raw
    assert max(want) - min(want) > 1e-3

    srv = build_server(str(reward_dir), api_key="k", served_model_name="rm", device="cpu")
    auth = {"Authorization": "Bearer k"}
    with serve_in_thread(create_app(srv)) as url:
        resp = httpx.post(url + "/v1/score", json={"pairs": PAIRS}, headers=auth, timeout=60)
        assert resp.status_code == 200, resp.text
        torch.testing.assert_close(torch.tensor(resp.json()["scores"]), torch.tensor(want), atol=1e-5, rtol=1e-5)
        # PPO's remote-reward option, pointed at this server, gets the same rewards.
        remote = RemoteReward(url, api_key="k")(prompts, responses)
        assert remote == pytest.approx(want, abs=1e-5)
        # Generation routes refuse a reward model; bad bodies and missing keys get OpenAI-style errors.
        chat = httpx.post(url + "/v1/chat/completions", headers=auth,
                          json={"model": "rm", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "model_not_supported"
        bad = httpx.post(url + "/v1/score", json={"pairs": [{"prompt": "x"}]}, headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "pairs.0.response"
        assert httpx.post(url + "/v1/score", json={"pairs": PAIRS}).status_code == 401
        metrics = httpx.get(url + "/metrics", headers=auth).text
        assert "alignloop_scored_pairs_total 8.0" in metrics  # both clients


def test_exported_reward_model_serves_the_same_scores(reward_dir, tmp_path):
    out = export_model(reward_dir, tmp_path / "exported-rm")
    assert "text-classification" in (out / "README.md").read_text()
    want = RewardModel.load(reward_dir, device="cpu").score([PAIRS[0]["prompt"]], [PAIRS[0]["response"]])
    srv = build_server(str(out), device="cpu")
    with serve_in_thread(create_app(srv)) as url:
        got = httpx.post(url + "/v1/score", json={"pairs": PAIRS[:1]}, timeout=60).json()["scores"]
    assert got == pytest.approx(want, abs=1e-5)
