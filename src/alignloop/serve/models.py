"""/v1/models: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter

from alignloop.serve.deps import ServerDep
from alignloop.serve.schemas import ERROR_RESPONSES, ModelCard, ModelList

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


@router.get("/v1/models", response_model=ModelList)
async def list_models(server: ServerDep) -> ModelList:
    return ModelList(data=[ModelCard(id=server.model_name, created=server.created, owned_by="alignloop")])
