"""/health (is the engine alive) and /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from alignloop.serve.deps import ServerDep
from alignloop.serve.errors import error_response
from alignloop.serve.schemas import ERROR_RESPONSES, ERROR_RESPONSES_OF_TEXT_ROUTE, Health

router = APIRouter(tags=["health"], responses=ERROR_RESPONSES)


class PrometheusResponse(Response):
    media_type = CONTENT_TYPE_LATEST


@router.get("/health", response_model=Health)
async def health(server: ServerDep) -> Health | JSONResponse:
    if server.engine is not None and not server.engine.is_alive():
        return error_response(503, "the generation engine has stopped", type_="server_error")
    return Health(model=server.model_name)


@router.get("/metrics", response_class=PrometheusResponse,
            responses={200: {"description": "the server's metrics in Prometheus' text format"},
                       **ERROR_RESPONSES_OF_TEXT_ROUTE})
async def metrics(server: ServerDep) -> PrometheusResponse:
    return PrometheusResponse(server.metrics.render())
