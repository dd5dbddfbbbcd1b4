//! The OpenAPI 3.0 description of exactly what [`crate::routes`] serves, limits included (the
//! served model id, the largest `max_tokens`), so that a schema-driven fuzzer stays in bounds.

use serde_json::{json, Value};

use crate::openai::{MAX_STOP, MAX_STOP_BYTES};
use baton_model::sampling::MAX_TOP_LOGPROBS;

fn error_responses(codes: &[&str]) -> serde_json::Map<String, Value> {
    codes
        .iter()
        .map(|&c| {
            let mut r = json!({
                "description": match c {
                    "400" => "invalid JSON or parameter (`error.param` names it), or context length exceeded",
                    "401" => "missing or wrong API key",
                    "404" => "unknown model or path",
                    "413" => "request body too large",
                    "429" => "queue full; retry after `Retry-After` seconds",
                    "503" => "not ready; retry after `Retry-After` seconds",
                    _ => "error",
                },
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            });
            if c == "429" || c == "503" {
                r["headers"] = json!({"Retry-After": {"schema": {"type": "integer", "minimum": 1}}});
            }
            (c.to_owned(), r)
        })
        .collect()
}

/// Responses of a generation endpoint: the JSON body or, with `stream`, server-sent events.
fn generation_responses(schema: &str, auth: bool) -> Value {
    let mut r = error_responses(if auth {
        &["400", "401", "404", "413", "429", "503"]
    } else {
        &["400", "404", "413", "429", "503"]
    });
    r.insert(
        "200".into(),
        json!({
            "description": "the completion, or with `stream: true` server-sent events `data: <chunk>` ending with `data: [DONE]`",
            "content": {
                "application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}},
                // Before OpenAPI 3.2, an event stream's `schema` describes one event.
                "text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
                    "data": {"type": "string", "description": "a chunk as JSON, or `[DONE]` last"},
                    "event": {"type": "string"}
                }}}
            }
        }),
    );
    Value::Object(r)
}

fn guarded_responses(ok: Value, auth: bool, extra: &[&str]) -> Value {
    let mut codes = extra.to_vec();
    if auth {
        codes.push("401");
    }
    let mut r = error_responses(&codes);
    r.insert("200".into(), ok);
    Value::Object(r)
}

fn json_ok(description: &str, schema: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

/// The common sampling fields of both generation requests.
fn sampling_properties(model_id: &str, max_tokens: usize) -> serde_json::Map<String, Value> {
    let v = json!({
        "model": {"type": "string", "enum": [model_id]},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": max_tokens},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": 1000000, "description": "extension; -1 or 0 is off"},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1, "description": "extension"},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 10, "description": "extension"},
        "seed": {"type": "integer", "format": "int64"},
        "stop": {"anyOf": [
            {"type": "string", "maxLength": MAX_STOP_BYTES},
            {"type": "array", "items": {"type": "string", "maxLength": MAX_STOP_BYTES}, "maxItems": MAX_STOP}
        ]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"type": "integer", "enum": [1]},
        "user": {"type": "string"}
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a literal object"),
    }
}

/// The document served at `/openapi.json`.
pub fn document(model_id: &str, max_tokens: usize, auth: bool) -> Value {
    let mut chat_props = sampling_properties(model_id, max_tokens);
    chat_props.insert("max_completion_tokens".into(), json!({"type": "integer", "minimum": 1, "maximum": max_tokens}));
    chat_props.insert("messages".into(), json!({"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Message"}}));
    chat_props.insert("logprobs".into(), json!({"type": "boolean"}));
    chat_props.insert("top_logprobs".into(), json!({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS, "description": "needs `logprobs: true`"}));
    let mut completion_props = sampling_properties(model_id, max_tokens);
    completion_props.insert("prompt".into(), json!({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    ]}));
    completion_props.insert("logprobs".into(), json!({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}));

    let logprob = json!({"type": "object", "required": ["token", "logprob", "bytes"], "properties": {
        "token": {"type": "string"}, "logprob": {"type": "number"},
        "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}
    }});
    let mut token_logprob = logprob.clone();
    token_logprob["required"] = json!(["token", "logprob", "bytes", "top_logprobs"]);
    token_logprob["properties"]["top_logprobs"] = json!({"type": "array", "items": {"$ref": "#/components/schemas/TopLogprob"}});
    let finish = json!({"type": "string", "enum": ["stop", "length"]});
    let security = if auth { json!([{"bearer": []}]) } else { json!([]) };

    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "baton OpenAI-compatible API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The subset of OpenAI's API that baton serves. Fields not listed are ignored, except `n` other than 1, tools, `response_format` other than text, `logit_bias`, `echo` and `suffix`, which are refused with 400."
        },
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "security": security,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": generation_responses("ChatCompletion", auth)
            }},
            "/v1/completions": {"post": {
                "operationId": "createCompletion",
                "security": security,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CompletionRequest"}}}},
                "responses": generation_responses("Completion", auth)
            }},
            "/v1/models": {"get": {
                "operationId": "listModels",
                "security": security,
                "responses": guarded_responses(json_ok("the served model", "ModelList"), auth, &[])
            }},
            "/v1/models/{id}": {"get": {
                "operationId": "retrieveModel",
                "security": security,
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": guarded_responses(json_ok("the model", "Model"), auth, &["404"])
            }},
            "/tokenize": {"post": {
                "operationId": "tokenize",
                "description": "extension (as vLLM): the token ids a prompt, or messages through the chat template, become",
                "security": security,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TokenizeRequest"}}}},
                "responses": guarded_responses(json_ok("the tokens", "Tokenized"), auth, &["400", "404", "413"])
            }},
            "/health": {"get": {
                "operationId": "health",
                "security": [],
                "responses": {"200": json_ok("the server is alive", "Status")}
            }},
            "/ready": {"get": {
                "operationId": "ready",
                "security": [],
                "responses": guarded_responses(json_ok("the model is loaded and every stage is up", "Status"), false, &["503"])
            }},
            "/metrics": {"get": {
                "operationId": "metrics",
                "security": [],
                "responses": {"200": {"description": "Prometheus exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}}
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi",
                "security": [],
                "responses": {"200": {"description": "this document", "content": {"application/json": {"schema": {"type": "object"}}}}}
            }}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": chat_props},
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": completion_props},
                "Message": {"type": "object", "required": ["role", "content"], "properties": {
                    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                    "content": {"anyOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}}
                    ]},
                    "name": {"type": "string"}
                }},
                "TextPart": {"type": "object", "required": ["type", "text"], "properties": {
                    "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}
                }},
                "Usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
                    "prompt_tokens": {"type": "integer", "minimum": 0},
                    "completion_tokens": {"type": "integer", "minimum": 0},
                    "total_tokens": {"type": "integer", "minimum": 0}
                }},
                "TopLogprob": logprob,
                "TokenLogprob": token_logprob,
                "ChatLogprobs": {"type": "object", "nullable": true, "required": ["content"], "properties": {
                    "content": {"type": "array", "items": {"$ref": "#/components/schemas/TokenLogprob"}}
                }},
                "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
                    "id": {"type": "string"},
                    "object": {"type": "string", "enum": ["chat.completion"]},
                    "created": {"type": "integer"},
                    "model": {"type": "string"},
                    "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "object",
                        "required": ["index", "message", "logprobs", "finish_reason"], "properties": {
                        "index": {"type": "integer", "enum": [0]},
                        "message": {"type": "object", "required": ["role", "content"], "properties": {
                            "role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string"}
                        }},
                        "logprobs": {"$ref": "#/components/schemas/ChatLogprobs"},
                        "finish_reason": finish
                    }}},
                    "usage": {"$ref": "#/components/schemas/Usage"}
                }},
                "CompletionLogprobs": {"type": "object", "nullable": true, "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"], "properties": {
                    "tokens": {"type": "array", "items": {"type": "string"}},
                    "token_logprobs": {"type": "array", "items": {"type": "number"}},
                    "top_logprobs": {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "number"}}},
                    "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}}
                }},
                "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
                    "id": {"type": "string"},
                    "object": {"type": "string", "enum": ["text_completion"]},
                    "created": {"type": "integer"},
                    "model": {"type": "string"},
                    "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "object",
                        "required": ["index", "text", "logprobs", "finish_reason"], "properties": {
                        "index": {"type": "integer", "enum": [0]},
                        "text": {"type": "string"},
                        "logprobs": {"$ref": "#/components/schemas/CompletionLogprobs"},
                        "finish_reason": finish
                    }}},
                    "usage": {"$ref": "#/components/schemas/Usage"}
                }},
                "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
                    "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                    "created": {"type": "integer"}, "owned_by": {"type": "string"},
                    "max_model_len": {"type": "integer", "description": "extension: prompt plus completion tokens"}
                }},
                "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"type": "string", "enum": ["list"]},
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}
                }},
                "TokenizeRequest": {"type": "object", "properties": {
                    "model": {"type": "string", "enum": [model_id]},
                    "prompt": {"type": "string"},
                    "messages": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Message"}}
                }},
                "Tokenized": {"type": "object", "required": ["count", "max_model_len", "tokens"], "properties": {
                    "count": {"type": "integer", "minimum": 0},
                    "max_model_len": {"type": "integer"},
                    "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}
                }},
                "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": "string", "nullable": true},
                        "code": {"type": "string", "nullable": true}
                    }
                }}}
            }
        }
    })
}
