"""B5's baseline: the job llmbatching automates, done by hand with the official openai SDK and
psycopg, as a careful engineer would write it for one run (no crash safety, no retries).

Reads reviews(id, body), sends one /v1/responses request per row through the Batch API in files
of BATCH_SIZE lines, waits for every batch, and writes each answer into reviews.answer.
Environment: BASE_URL (the provider), DSN (the database), BATCH_SIZE.
"""

import io
import json
import os
import time

import openai
import psycopg

client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key="sk-bench")
batch_size = int(os.environ.get("BATCH_SIZE", "50000"))

with psycopg.connect(os.environ["DSN"]) as conn:
    rows = conn.execute("SELECT id, body FROM reviews ORDER BY id").fetchall()

    batches = []
    for start in range(0, len(rows), batch_size):
        buf = io.BytesIO()
        for row_id, body in rows[start:start + batch_size]:
            line = {"custom_id": str(row_id), "method": "POST", "url": "/v1/responses",
                    "body": {"model": "gpt-4o-mini", "input": body}}
            buf.write(json.dumps(line).encode())
            buf.write(b"\n")
        uploaded = client.files.create(file=("input.jsonl", buf.getvalue()), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses",
                                      completion_window="24h")
        batches.append(batch.id)

    pending = set(batches)
    finished = []
    while pending:
        for batch_id in list(pending):
            batch = client.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                pending.discard(batch_id)
                finished.append(batch)
        if pending:
            time.sleep(0.1)

    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE answers (id bigint, answer text)")
        with cur.copy("COPY answers (id, answer) FROM STDIN") as copy:
            for batch in finished:
                content = client.files.content(batch.output_file_id).text
                for line in content.splitlines():
                    result = json.loads(line)
                    body = result["response"]["body"]
                    text = "".join(part["text"] for item in body["output"] for part in item["content"]
                                   if part["type"] == "output_text")
                    copy.write_row((int(result["custom_id"]), text))
        cur.execute("UPDATE reviews r SET answer = a.answer FROM answers a WHERE r.id = a.id")
    conn.commit()
