// An application using the official openai Node SDK against llmbatching-gateway: it calls as it
// would call OpenAI, and calls again while the answer is pending (422).
import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.LLMBATCHING_KEY,
  baseURL: process.env.LLMBATCHING_BASE_URL,
  maxRetries: 0,
});
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function untilReady(call) {
  const deadline = Date.now() + 120_000;
  while (true) {
    try {
      return await call();
    } catch (e) {
      if (e.status !== 422 || Date.now() > deadline) throw e;
      await sleep(200);
    }
  }
}

const response = await untilReady(() => client.responses.create({ model: "gpt-4o-mini", input: "Hello from Node" }));
const chat = await untilReady(() =>
  client.chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "Chat from Node" }] }),
);
const embedding = await untilReady(() => client.embeddings.create({ model: "text-embedding-3-small", input: "embed me" }));
console.log(
  JSON.stringify({
    responses: response.output_text,
    chat: chat.choices[0].message.content,
    embedding: embedding.data[0].embedding.length,
  }),
);
