"""/v1/score: rewards of (prompt, response) pairs from a reward-model server."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from alignloop.serve.deps import ServerDep
from alignloop.serve.errors import APIError
from alignloop.serve.schemas import ERROR_RESPONSES, ScoreRequest, ScoreResponse

router = APIRouter(tags=["score"], responses=ERROR_RESPONSES)


@router.post("/v1/score", response_model=ScoreResponse)
async def score(req: ScoreRequest, server: ServerDep) -> ScoreResponse:
    """The reward model's normalised reward for each pair, in order."""
    if server.scorer is None:
        raise APIError(400, f"'{server.model_name}' is not a reward model; /v1/score needs a reward-model "
                            "folder (alignloop.json stage 'rm')", code="model_not_supported")
    if req.model is not None:
        server.check_model(req.model)
    if len(req.pairs) > server.limits.max_score_pairs:
        raise APIError(400, f"{len(req.pairs)} pairs in one request; the limit is "
                            f"{server.limits.max_score_pairs}", param="pairs")
    prompts = [p.prompt if isinstance(p.prompt, str) else [m.model_dump() for m in p.prompt] for p in req.pairs]
    responses = [p.response for p in req.pairs]
    async with server.score_lock:  # one scoring batch at a time owns the model
        scores = await asyncio.to_thread(server.scorer, prompts, responses)
    server.metrics.scored_pairs.inc(len(scores))
    return ScoreResponse(model=server.model_name, scores=[float(s) for s in scores])
