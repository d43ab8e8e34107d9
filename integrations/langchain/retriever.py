"""A LangChain retriever over an icmem store: documents are the recalled spans."""

from __future__ import annotations

from typing import Any

from icmem.store.namespaces import validate_namespace
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from icmem.pipeline import DEFAULT_NAMESPACE, MemoryPipeline


class ICAERetriever(BaseRetriever):
    """Retrieve the spans nearest to a query, with where they came from in `metadata`.

    The documents carry span text (the store keeps it beside the slots); use `ChatICAE` to
    answer from the compressed slots instead of the text.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    pipeline: MemoryPipeline
    namespace: tuple[str, ...] = DEFAULT_NAMESPACE
    k: int = Field(default=4, gt=0)
    filter: dict[str, Any] | None = None

    def __init__(self, **data: Any) -> None:
        if "namespace" in data:  # the store's rule and message, as ChatICAE
            data["namespace"] = validate_namespace(data["namespace"])
        super().__init__(**data)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        hits = self.pipeline.search(
            query,
            namespace=self.namespace,
            k=kwargs.get("k", self.k),
            filter=kwargs.get("filter", self.filter),
        )
        return [
            Document(
                page_content=hit.text,
                metadata={
                    **hit.metadata,
                    "document_id": hit.document_id,
                    "span_id": hit.span_id,
                    "position": hit.position,
                    "char_start": hit.char_start,
                    "char_end": hit.char_end,
                    "source": hit.source,
                    "score": hit.score,
                },
            )
            for hit in hits
        ]
