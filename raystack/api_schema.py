"""The HTTP API's request and response types as pydantic models, for ``/openapi.json`` (client generators, API
tools, the ``/docs`` page).

They *document*; ``raystack.openai_api`` *parses*. Bodies are read by hand there so that every invalid body is a 400
in OpenAI's error shape naming the parameter, checked in the engine's precision (a pydantic validation error would
name pydantic's location, and accept numbers the sampler cannot hold). ``tests/unit/test_api_schema.py`` keeps the
two in step: every field the parser knows is documented with its type and range, and nothing else.
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from raystack.engine import MAX_TOP_LOGPROBS
from raystack.openai_api import MAX_MESSAGES, MAX_N
from raystack.tokenizer import VOCAB_SIZE


def below(n: int) -> str:
    """A regular expression for the decimal numbers in [0, n), leading zeros allowed (how the parser reads a token
    id given as an object key: ``int`` of ASCII digits)."""
    top = str(n - 1)
    if len(top) == 1:
        alternatives = [f"[0-{top}]"]
    else:
        alternatives = ["[0-9]"] + [f"[1-9][0-9]{{{k - 1}}}" for k in range(2, len(top))]
        for i, digit in enumerate(map(int, top)):  # top's own length: a prefix of top, then a smaller digit
            low = 1 if i == 0 else 0
            if digit > low:
                alternatives.append(f"{top[:i]}[{low}-{digit - 1}]" + "[0-9]" * (len(top) - i - 1))
        alternatives.append(top)
    return f"^0*(?:{'|'.join(alternatives)})$"


TokenIds = list[Annotated[int, Field(ge=0, le=VOCAB_SIZE - 1)]]
StopString = Annotated[str, Field(min_length=1)]
Stop = Union[StopString, Annotated[list[StopString], Field(max_length=4)], None]
LogitBias = Optional[Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(json_schema_extra={
    "propertyNames": {"pattern": below(VOCAB_SIZE), "maxLength": 18}})]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: Optional[bool] = Field(None, description="Send a last chunk with the request's usage.")
    continuous_usage_stats: Optional[bool] = Field(None, description="Accepted for vLLM clients; no effect.")


class _Sampling(_Strict):
    """The sampling fields completions and chat share."""

    model: str = Field(description="The served model's id (GET /v1/models).")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy. Default 1 (or the serve "
                                                                        "spec's sampling.temperature).")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    n: Optional[int] = Field(None, ge=1, le=MAX_N, description="Choices per prompt.")
    stream: Optional[bool] = Field(None, description="Send server-sent events, ending with data: [DONE].")
    stream_options: Optional[StreamOptions] = None
    stop: Stop = Field(None, description="Up to 4 strings that end a choice (not included in it).")
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1, description="Seed of the draw; choice j of a "
                                                                             "prompt uses seed + j.")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: LogitBias = Field(None, description="Token id (as a string) -> bias added to its logit before "
                                                    "the penalties, temperature and filters.")
    user: Optional[str] = None
    top_k: Optional[int] = Field(None, ge=-1, description="vLLM extension: keep the k most likely tokens; 0 or -1 "
                                                          "= all.")
    min_p: Optional[float] = Field(None, ge=0, le=1, description="vLLM extension: drop tokens below min_p times "
                                                                 "the most likely one's probability.")
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=2, description="vLLM extension (CTRL's rule).")
    ignore_eos: Optional[bool] = Field(None, description="vLLM extension: keep generating after <|endoftext|>.")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={  # max_tokens 0 scores the echoed prompt
        "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
        "then": {"required": ["echo"], "properties": {"echo": {"const": True}}}})

    prompt: Union[str, Annotated[list[str], Field(min_length=1)], Annotated[TokenIds, Field(min_length=1)],
                  Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)], None] = Field(
        None, description="Text, texts, token ids or lists of token ids; null = <|endoftext|> (a new document).")
    max_tokens: Optional[int] = Field(None, ge=0, description="Tokens to generate; 0 only with echo (score the "
                                                              "prompt). Default 16 (or the serve spec's).")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "Return each token's log-probability under the model's own distribution (before bias, penalties and "
        "filters) and this many most likely alternatives (up to 20, as vLLM)."))
    echo: Optional[bool] = Field(None, description="Return the prompt before the completion (scored too, with "
                                                   "logprobs).")
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N, description="Draw this many and return the n with the "
                                                                     "highest log-probability; not streamable.")
    suffix: Optional[str] = Field(None, max_length=0, description="Not supported by this model: null or empty only.")


class ChatMessageTextPart(BaseModel):
    """A text part; any other key (a client's ``cache_control``) is ignored."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[ChatMessageTextPart], Field(min_length=1)]]
    name: Optional[str] = None
    # What an assistant message from a response carries besides its text, taken back at its empty value only.
    refusal: None = None
    tool_calls: Optional[list] = Field(None, max_length=0, description="Not supported: null or [] only.")
    function_call: None = None
    audio: None = None
    annotations: Optional[list] = Field(None, max_length=0, description="null or [] only.")


class TextFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: ``messages`` rendered by the model's chat template."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={  # top_logprobs needs logprobs: true
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}})

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = Field(None, ge=1, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = Field(None, description="Return each token's log-probability (the model's own).")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token; "
                                                                                     "needs logprobs.")
    tools: Optional[list] = Field(None, max_length=0, description="Not supported: null or [] only.")
    tool_choice: Optional[Literal["none"]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[TextFormat] = Field(None, description='Only {"type": "text"}.')
    store: Optional[Literal[False]] = None
    metadata: Optional[Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                                 Field(max_length=16)]] = Field(None, description="Accepted and unused (OpenAI's "
                                                                                  "limits: 16 pairs of strings).")
    modalities: Optional[Annotated[list[Literal["text"]], Field(min_length=1, max_length=1)]] = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens found in the KV cache and not computed again (prefix "
                                           "caching: a conversation's earlier turns, a shared preamble).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="Each token: the character for ASCII, bytes:\\xNN otherwise.")
    token_logprobs: list[Optional[float]] = Field(description="Null for the first token of an echoed prompt.")
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int] = Field(description="Each token's character offset in the returned text.")


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[Literal["stop", "length"]]


class CompletionResponse(BaseModel):
    """A completion; streamed, each event is one with ``choices`` holding the new text (and ``usage`` null until
    the last event when ``stream_options.include_usage``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletionResponse(BaseModel):
    """A chat completion (streamed: ``chat.completion.chunk`` events whose choices carry a ``delta``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's): exactly one of ``prompt`` and ``messages``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [  # a null one counts as absent
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None
    return_token_strs: Optional[bool] = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


class Model(BaseModel):
    """``GET /v1/models/{model}`` (OpenAI's model object)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """``GET /v1/models``: the one model this server serves."""

    object: Literal["list"]
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """OpenAI's error shape; ``param`` names the offending request field."""

    error: ErrorDetail


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


def request_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of a route whose JSON body is ``model`` (parsed by hand, documented here)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def error_responses(*statuses: int) -> dict:
    """The error responses a route documents: ``statuses``, or all of them."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "Invalid request: the error's param names the field"), (401, "Missing or wrong API key"),
        (404, "Unknown model"), (413, "Body too large"), (503, "Overloaded: retry after Retry-After seconds"))
        if not statuses or status in statuses}


def for_deployment(document: dict, model_name: str, max_model_len: int, max_sequences: int) -> dict:
    """A copy of ``document`` for one deployment: every request's ``model`` is the served model's id (another is a
    404), and prompts and ``max_tokens`` are bounded by its context, so a client generator or a fuzzer sends what
    this server takes. What no schema can say is left to the 400s: prompt + ``max_tokens`` within the context,
    prompts x ``n`` within ``max_sequences``."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    for name in (m.__name__ for m in REQUEST_MODELS):
        for option in _options(schemas[name]["properties"]["model"]):
            if option.get("type") == "string":
                option["enum"] = [model_name]
    within = max_model_len - 1  # a prompt holds at least one token, so does a completion
    for option in _options(schemas["CompletionRequest"]["properties"]["prompt"]):
        if option.get("type") == "string":
            option["maxLength"] = within  # every character is at least one byte token
        elif option.get("type") == "array":
            items = option["items"]
            if items.get("type") == "string":
                option["maxItems"], items["maxLength"] = max_sequences, within
            elif items.get("type") == "integer":
                option["maxItems"] = within
            else:
                option["maxItems"], items["maxItems"] = max_sequences, within
    for name, field in (("CompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_tokens"),
                        ("ChatCompletionRequest", "max_completion_tokens")):
        for option in _options(schemas[name]["properties"][field]):
            if option.get("type") == "integer":
                option["maximum"] = within
    for option in _options(schemas["TokenizeRequest"]["properties"]["prompt"]):
        if option.get("type") == "string":
            option["maxLength"] = 4 * max_model_len
    schemas["DetokenizeRequest"]["properties"]["tokens"]["maxItems"] = 4 * max_model_len
    return document


def _options(prop: dict) -> list[dict]:
    return prop.get("anyOf", [prop])


def add_request_schemas(schema: dict) -> dict:
    """``schema`` (FastAPI's OpenAPI document) with the request models under ``components.schemas``."""
    from pydantic.json_schema import models_json_schema

    _, definitions = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                        ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
    return schema
