"""What the standard LangChain integration suite needs to know about ChatICAE, shared by its runs
on the tiny model (test_langchain.py) and on the default model (test_chat_default_model.py)."""

from __future__ import annotations

from icmem.integrations.langchain import ChatICAE
from langchain_tests.integration_tests import ChatModelIntegrationTests


class ChatICAESuite(ChatModelIntegrationTests):
    """Tool calls in the suite are forced (tool_choice "any"): forced calls are decoded under the
    tools' schemas, so they always parse. Subclasses give ``chat_model_params``."""

    @property
    def chat_model_class(self) -> type[ChatICAE]:
        return ChatICAE

    @property
    def standard_chat_model_params(self) -> dict:
        params = dict(super().standard_chat_model_params)
        params.pop("api_key", None)  # a local model has no API key to accept
        return params

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def tool_choice_value(self) -> str:
        return "any"

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": [], "stream": []}
