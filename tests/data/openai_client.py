"""Drives a fogmesh node with the official `openai` client, unchanged.

Usage: openai_client.py BASE_URL MODEL. Prints one JSON object with what it
saw; tests/api.rs checks it.
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="fogmesh-ignores-keys", max_retries=0)
ids = [m.id for m in client.models.list().data]
assert model in ids, ids
question = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0)
assert chat.usage.completion_tokens == 16 or chat.choices[0].finish_reason == "stop", chat
stream = client.chat.completions.create(
    model=model, messages=question, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
)
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
with_lp = client.chat.completions.create(model=model, messages=question, max_tokens=4, temperature=0, logprobs=True)
lp = with_lp.choices[0].logprobs.content
assert len(lp) == with_lp.usage.completion_tokens and all(e.logprob <= 0 for e in lp), with_lp
completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
try:
    client.chat.completions.create(model="no-such-model", messages=question)
    not_found = None
except openai.NotFoundError as e:
    not_found = e.status_code
try:
    client.chat.completions.create(model=model, messages=question, max_tokens=10**6)
    bad_request = None
except openai.BadRequestError as e:
    bad_request = e.status_code
print(json.dumps({
    "chat": chat.choices[0].message.content,
    "chat_stream": "".join(pieces),
    "completion": completion.choices[0].text,
    "not_found": not_found,
    "bad_request": bad_request,
    "logprobs": len(lp),
}))
