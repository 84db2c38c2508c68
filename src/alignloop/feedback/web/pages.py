"""What the HTML pages share: the templates (Jinja2, autoescaped), ``render`` and the pages' script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from alignloop.feedback import charts
from alignloop.feedback.db import ROLES, User

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"
# Autoescaping is on for .html: prompts, model outputs, comments and names are only ever shown as text.
templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
templates.env.globals["roles"] = ROLES

router = APIRouter(include_in_schema=False)


@router.get("/static/app.js")
def app_script() -> FileResponse:
    return FileResponse(TEMPLATE_DIR / "app.js", media_type="text/javascript")


def render(request: Request, name: str, user: User | None, status: int = 200, **context: Any) -> HTMLResponse:
    """The template ``name`` with the caller and the CSRF token its forms must carry."""
    context.update(user=user, csrf=getattr(request.state, "csrf", ""))
    return templates.TemplateResponse(request, name, context, status_code=status)


def win_rate_chart(rates: list[dict[str, Any]]) -> str:
    return charts.interval_chart([(f"{r['model_a']} vs {r['model_b']}", r["win_rate"], r["ci_low"],
                                   r["ci_high"]) for r in rates])
