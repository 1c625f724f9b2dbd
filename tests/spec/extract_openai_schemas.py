"""Re-create openai_schemas.json from OpenAI's published description (run by hand).

    python tests/spec/extract_openai_schemas.py path/to/openapi.json COMMIT

The source is github.com/openai/openai-openapi (``openapi.json``, MIT licence, see
LICENSE.openai here). Only the component schemas the gateway answers with, and
everything they reference, are kept; the tests validate against this pinned copy
and never read the network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "Response",
    "ResponseStreamEvent",
    "ErrorResponse",
    # For the Files and Batch APIs.
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "Batch",
    "ListBatchesResponse",
)


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value.rsplit("/", 1)[-1])
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def main(source: str, commit: str) -> None:
    schemas = json.loads(Path(source).read_text())["components"]["schemas"]
    keep: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep[name] = schemas[name]
            todo.extend(_refs(schemas[name]))
    out = {
        "source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json",
        "components": {"schemas": dict(sorted(keep.items()))},
    }
    target = Path(__file__).with_name("openai_schemas.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
