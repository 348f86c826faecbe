"""The documented API (pydantic models in /openapi.json) and the hand parser agree field for field, range for range."""

import pytest

from raystack import api_schema as schema
from raystack.openai_api import (CHAT_FIELDS, KNOWN_FIELDS, MESSAGE_NO_OPS, APIError, ChatTemplate, RequestLimits,
                                 parse_chat, parse_completion)
from raystack.tokenizer import DEFAULT_CHAT_TEMPLATE

LIMITS = RequestLimits(vocab_size=257, max_model_len=4096, max_sequences=64)
TEMPLATE = ChatTemplate(DEFAULT_CHAT_TEMPLATE)


def parse(model, body: dict):
    if model is schema.CompletionRequest:
        return parse_completion({"model": "raystack", "prompt": "x", **body}, "raystack", LIMITS)
    return parse_chat({"model": "raystack", "messages": [{"role": "user", "content": "x"}], **body}, "raystack",
                      LIMITS, TEMPLATE)


def test_every_field_the_parser_takes_is_documented_and_nothing_else():
    assert set(schema.CompletionRequest.model_fields) == KNOWN_FIELDS
    assert set(schema.ChatCompletionRequest.model_fields) == CHAT_FIELDS
    assert set(schema.ChatMessage.model_fields) == {"role", "content", "name", *MESSAGE_NO_OPS}


def test_a_message_field_taken_only_empty_is_so_in_the_schema_and_the_parser():
    """An assistant message as a response returned it (``refusal: null``, and what other servers add empty) is taken
    back; a non-empty one is refused by both, naming the field."""
    for field, empties in MESSAGE_NO_OPS.items():
        for empty in empties:
            message = {"role": "assistant", "content": "y", field: empty}
            schema.ChatMessage.model_validate(message)
            parse(schema.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}, message]})
        message = {"role": "assistant", "content": "y", field: [{"type": "function"}] if [] in empties else "z"}
        with pytest.raises(ValueError):
            schema.ChatMessage.model_validate(message)
        with pytest.raises(APIError) as error:
            parse(schema.ChatCompletionRequest, {"messages": [message]})
        assert error.value.param == f"messages[0].{field}" and "not supported" in error.value.message


def bounds(model):
    """(field, low, high, exclusive low) of every numeric field the schema bounds."""
    out = []
    for name, prop in model.model_json_schema()["properties"].items():
        for option in prop.get("anyOf", [prop]):
            if option.get("type") in ("number", "integer") and ("maximum" in option or "minimum" in option):
                low = option.get("minimum", option.get("exclusiveMinimum"))
                out.append((name, option["type"], low, option.get("maximum"), "exclusiveMinimum" in option))
    return out


@pytest.mark.parametrize("model", [schema.CompletionRequest, schema.ChatCompletionRequest])
def test_documented_ranges_are_the_parsers(model):
    """At each documented bound the parser accepts; one step outside it refuses, naming the field."""
    checked = 0
    extra = {"echo": True} if model is schema.CompletionRequest else {"logprobs": True}
    for name, kind, low, high, exclusive in bounds(model):
        step = 1 if kind == "integer" else 1e-3
        edges = [(high, True), (high + step, False)] if high is not None and high < 2**62 else []
        if low is not None and low > -(2**62):
            edges += [(low, not exclusive), (low - step, False)]
        for value, ok in edges:
            if name == "max_tokens" and value == 0 and model is schema.CompletionRequest:
                ok = True  # echo scoring
            body = {name: value, **extra}
            if name in ("n", "best_of"):
                body = {"n": 1, "best_of": value} if name == "best_of" else {name: value}
            if ok:
                parse(model, body)
            else:
                with pytest.raises(APIError) as error:
                    parse(model, body)
                assert error.value.param == name, (name, value, error.value.message)
            checked += 1
    assert checked >= 20


def test_the_served_document_holds_request_and_response_schemas():
    from raystack.serving import app

    document = schema.add_request_schemas(app.openapi())
    components = document["components"]["schemas"]
    for path, request, response in (("/v1/completions", "CompletionRequest", "CompletionResponse"),
                                    ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionResponse"),
                                    ("/tokenize", "TokenizeRequest", "TokenizeResponse"),
                                    ("/detokenize", "DetokenizeRequest", "DetokenizeResponse")):
        post = document["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + request)
        assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + response)
        assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert request in components and response in components
    for path, response, errors in (("/v1/models", "ModelList", {"401"}),
                                   ("/v1/models/{model}", "Model", {"401", "404"})):
        get = document["paths"][path]["get"]
        assert get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + response)
        assert errors <= set(get["responses"]) and "400" not in get["responses"]
    temperature = components["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert temperature == {"type": "number", "minimum": 0, "maximum": 2}
    assert all(ref.startswith("#/components/schemas/") for ref in _refs(document))
    assert {ref.rsplit("/", 1)[1] for ref in _refs(document)} <= set(components)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_the_model_routes_bodies_are_their_documented_shapes():
    from raystack.openai_api import model_body, models_body

    assert schema.ModelList.model_validate(models_body("org/name", 7)).data[0].id == "org/name"
    assert schema.Model.model_validate(model_body("raystack", 7)).model_dump() == {
        "id": "raystack", "object": "model", "created": 7, "owned_by": "raystack"}


@pytest.fixture(scope="module")
def served():
    """``validate(schema_name, body)``: whether the document a replica serves (``/openapi.json``) takes ``body``."""
    import jsonschema

    from raystack.serving import app

    document = schema.for_deployment(schema.add_request_schemas(app.openapi()), "raystack", LIMITS.max_model_len,
                                     LIMITS.max_sequences)

    def validate(name: str, body: dict) -> bool:
        root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        return jsonschema.Draft202012Validator(root).is_valid(body)

    return validate


def parser_takes(name: str, body: dict) -> bool:
    from raystack.openai_api import parse_detokenize, parse_tokenize

    try:
        if name == "TokenizeRequest":
            parse_tokenize(body, "raystack", LIMITS, TEMPLATE)
        elif name == "DetokenizeRequest":
            parse_detokenize(body, "raystack", LIMITS)
        else:
            parse(getattr(schema, name), body)
    except APIError:
        return False
    return True


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("name, body", [
    *[("CompletionRequest", {"logit_bias": {key: 1}}) for key in (
        "0", "256", "0256", "0" * 15 + "256", "257", "1000", "-1", "+1", "1e2", " 1", "", "\u0661", "0" * 16 + "256")],
    ("DetokenizeRequest", {"tokens": [0, 256]}), ("DetokenizeRequest", {"tokens": [257]}),
    ("CompletionRequest", {"prompt": [256]}), ("CompletionRequest", {"prompt": [[1], [257]]}),
    *[("CompletionRequest", {"prompt": value}) for value in ([], [[]], [[1], []], [""], ["a", 1], [[1], 2])],
    *[("ChatCompletionRequest", {"messages": [{"role": "user", "content": value}]}) for value in (
        [], [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}], [{"type": "text"}], "")],
    ("TokenizeRequest", {}), ("TokenizeRequest", {"prompt": "x"}), ("TokenizeRequest", {"messages": USER}),
    ("TokenizeRequest", {"prompt": "x", "messages": USER}), ("TokenizeRequest", {"prompt": None, "messages": USER}),
    ("TokenizeRequest", {"prompt": "x", "messages": None}), ("TokenizeRequest", {"prompt": None}),
    ("ChatCompletionRequest", {"modalities": ["text"]}), ("ChatCompletionRequest", {"modalities": []}),
    *[("ChatCompletionRequest", {field: value}) for field, value in (
        ("store", False), ("store", 0), ("parallel_tool_calls", True), ("parallel_tool_calls", 1),
        ("tools", []), ("tools", 0))],
    ("ChatCompletionRequest", {"messages": USER * 3}), ("ChatCompletionRequest", {"messages": USER * 1025}),
    ("TokenizeRequest", {"messages": []}), ("TokenizeRequest", {"messages": USER * 1025}),
    ("CompletionRequest", {"max_tokens": 0}), ("CompletionRequest", {"max_tokens": 0, "echo": True}),
    ("CompletionRequest", {"max_tokens": 0.0, "echo": True}), ("CompletionRequest", {"max_tokens": 0, "echo": False}),
    ("CompletionRequest", {"top_p": 5e-324}), ("CompletionRequest", {"temperature": 1e-40}),
    ("CompletionRequest", {"top_p": -5e-324}),
    ("CompletionRequest", {"stop": ""}), ("CompletionRequest", {"stop": [""]}),
    ("CompletionRequest", {"suffix": ""}), ("CompletionRequest", {"suffix": "a"}),
    *[("ChatCompletionRequest", body) for body in ({"top_logprobs": 2}, {"top_logprobs": 2, "logprobs": False},
                                                   {"top_logprobs": None}, {"top_logprobs": 0, "logprobs": True})],
    ("ChatCompletionRequest", {"tools": []}), ("ChatCompletionRequest", {"tools": [{"type": "function"}]}),
    ("ChatCompletionRequest", {"response_format": {"type": "text"}}),
    ("ChatCompletionRequest", {"response_format": {"type": "json_object"}}),
    ("ChatCompletionRequest", {"response_format": {"type": "text", "x": 1}}),
    # the deployment's own limits (LIMITS: a context of 4096, 64 sequences)
    ("CompletionRequest", {"prompt": "x" * 4095, "max_tokens": 1}), ("CompletionRequest", {"prompt": "x" * 4096}),
    ("CompletionRequest", {"prompt": [1] * 4095, "max_tokens": 1}), ("CompletionRequest", {"prompt": [1] * 4096}),
    ("CompletionRequest", {"prompt": ["x"] * 64}), ("CompletionRequest", {"prompt": ["x"] * 65}),
    ("CompletionRequest", {"prompt": [[1]] * 65}), ("CompletionRequest", {"max_tokens": 4096}),
    ("ChatCompletionRequest", {"max_completion_tokens": 4096}), ("TokenizeRequest", {"prompt": "x" * 16384}),
    ("TokenizeRequest", {"prompt": "x" * 16385}), ("DetokenizeRequest", {"tokens": [1] * 16385}),
    ("CompletionRequest", {"model": "other"}), ("DetokenizeRequest", {"model": "other", "tokens": [1]}),
    # JSON has one number type: 5.0 is an integer to JSON Schema, so to the parser; 5.5 and true are not
    *[("CompletionRequest", {field: value}) for field in ("max_tokens", "n", "best_of", "seed", "logprobs", "top_k")
      for value in (2.0, 2.5, True)],
    ("CompletionRequest", {"prompt": [1.0, 2.0]}), ("CompletionRequest", {"prompt": [[1.0], [2.5]]}),
    ("DetokenizeRequest", {"tokens": [1.0]}), ("ChatCompletionRequest", {"logprobs": True, "top_logprobs": 2.0}),
    ("CompletionRequest", {"logit_bias": {"0": None}}), ("CompletionRequest", {"logit_bias": {"0": "1"}}),
    *[("ChatCompletionRequest", {"metadata": value}) for value in (
        {"k": "v"}, {"k": 1}, {"k": None}, {f"k{i}": "v" for i in range(16)}, {f"k{i}": "v" for i in range(17)},
        {"k" * 64: "v" * 512}, {"k" * 65: "v"}, {"k": "v" * 513}, [])],
])
def test_the_served_document_takes_a_body_exactly_when_the_parser_does(served, name, body):
    """What a schema-driven fuzzer (schemathesis) checks: a body the served document calls valid is not refused, and
    one it calls invalid is, at the edges the parser knows (token ids, a logit_bias key's digits, tokenize's one of
    prompt and messages, the served model)."""
    if name == "CompletionRequest":
        full = {"model": "raystack", "prompt": "x", **body}
    elif name == "ChatCompletionRequest":
        full = {"model": "raystack", "messages": USER, **body}
    else:
        full = body
    assert served(name, full) == parser_takes(name, full), full
