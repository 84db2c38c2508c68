"""The labelling web app: FastAPI routers per area (login, labelling, review, compare, admin), their shared
dependencies (deps.py), the JSON API's models (schemas.py) and ``create_app`` (app.py)."""
