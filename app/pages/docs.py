"""`/docs`: the OpenAPI description as a plain page (served locally, CSP-clean; the
machine-readable schema is at `/openapi.json`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from clipscope_explorer.app.templating import common_context

router = APIRouter()


def operations(schema: dict) -> list[dict]:
    """Each documented operation: method, path, summary, parameters, response schema name."""
    found = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            ok = op.get("responses", {}).get("200", {}).get("content", {})
            ref = ok.get("application/json", {}).get("schema", {}).get("$ref", "")
            found.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "tags": op.get("tags", []),
                    "response": ref.rsplit("/", 1)[-1] or ", ".join(ok) or "",
                    "parameters": [
                        {
                            "name": p["name"],
                            "in": p["in"],
                            "required": p.get("required", False),
                            "description": p.get("description") or p.get("schema", {}).get("description", ""),
                        }
                        for p in op.get("parameters", [])
                    ],
                }
            )
    return found


@router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
def api_docs(request: Request):
    schema = request.app.openapi()
    context = common_context(request)
    context.update(
        operations=operations(schema),
        schemas=schema.get("components", {}).get("schemas", {}),
        title="API",
        twin=context["urls"].openapi(),
    )
    return request.app.state.templates.TemplateResponse(request, "api_docs.html", context)
