"""An application using the official openai Python SDK against llmbatching-gateway: it calls as
it would call OpenAI, and calls again while the answer is pending (422)."""

import json
import os
import sys
import time

import openai

client = openai.OpenAI(
    api_key=os.environ["LLMBATCHING_KEY"],
    base_url=os.environ["LLMBATCHING_BASE_URL"],
    max_retries=0,
)


def until_ready(call):
    """Calls until the batch answer is there: 422 means queued or in a batch."""
    deadline = time.time() + 120
    while True:
        try:
            return call()
        except openai.UnprocessableEntityError as pending:
            assert pending.status_code == 422
            assert pending.body["type"] in ("queued", "submitted"), pending.body
            if time.time() > deadline:
                raise
            time.sleep(0.2)


response = until_ready(lambda: client.responses.create(model="gpt-4o-mini", input="Hello from Python"))
chat = until_ready(
    lambda: client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Chat from Python"}]
    )
)
embedding = until_ready(lambda: client.embeddings.create(model="text-embedding-3-small", input="embed me"))
# Held until the answer arrives instead of polling.
waited = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Waited for"}],
    extra_headers={"Prefer": "wait=60"},
)
try:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    )
    refused = None
except openai.BadRequestError as e:
    refused = e.status_code

print(
    json.dumps(
        {
            "responses": response.output_text,
            "chat": chat.choices[0].message.content,
            "embedding": len(embedding.data[0].embedding),
            "waited": waited.choices[0].message.content,
            "stream": refused,
        }
    )
)
sys.stdout.flush()
