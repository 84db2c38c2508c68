"""The routes' dependencies, at module level: the :class:`Server` of the app (its engine or scorer,
limits, metrics) and the API-key scheme.

The API key itself is checked in one place only, ``middleware.Guard``, on every request before its body
is read or its path is routed (an unauthenticated client learns nothing and uploads nothing). The
``API_KEY`` scheme here declares that check in the OpenAPI schema; ``create_app`` puts it on every
route when the server has a key.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from alignloop.serve.server import Server

API_KEY = HTTPBearer(auto_error=False, description="The server's API key (--api-key or ALIGNLOOP_API_KEY), as "
                                                   "'Authorization: Bearer KEY'; checked before anything else.")


def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]
