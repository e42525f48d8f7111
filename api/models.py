"""GET /v1/models and /v1/models/{id}: the one model this server serves, by its public id (never its folder)."""

from __future__ import annotations

from fastapi import APIRouter

from api.schemas import ModelCard, ModelList
from api.service import Service


def add_model_routes(service: Service, router: APIRouter) -> None:
    def model_card() -> ModelCard | None:
        current = service.manager.current
        if current is None:
            return None
        name = service.public_name()
        return ModelCard(id=name, created=service.started, root=name, max_model_len=current.pipeline.session_len)

    @router.get("/models", response_model=ModelList)
    async def list_models():
        card = model_card()
        return ModelList(data=[card] if card is not None else [])

    @router.get("/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str):
        service.resolve(model_id)
        return model_card()
