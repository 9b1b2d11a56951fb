// The official `openai` npm SDK against the REST shim, as any Node app would use it:
// models.list, a unary completion, a stream read with `for await`, and an error.
// Prints one JSON object with what it saw.
import OpenAI from "openai";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });
const request = { model, messages: [{ role: "user", content: "Hello from Node" }], max_tokens: 12, seed: 42,
                  ignore_eos: true };

const models = [];
for await (const m of client.models.list()) models.push(m.id);

const unary = await client.chat.completions.create(request);

const stream = await client.chat.completions.create({ ...request, stream: true,
                                                      stream_options: { include_usage: true } });
let text = "";
let firstRole = null;
let finish = null;
let usage = null;
for await (const chunk of stream) {
  for (const choice of chunk.choices) {
    firstRole ??= choice.delta.role ?? null;
    text += choice.delta.content ?? "";
    finish = choice.finish_reason ?? finish;
  }
  usage = chunk.usage ?? usage;
}

let error = null;
try {
  await client.chat.completions.create({ ...request, temperature: 9 });
} catch (e) {
  error = { status: e.status, type: e.type, param: e.param, code: e.code, message: e.message };
}

console.log(JSON.stringify({
  models,
  unary_text: unary.choices[0].message.content,
  unary_finish: unary.choices[0].finish_reason,
  unary_usage: unary.usage,
  stream_text: text,
  stream_first_role: firstRole,
  stream_finish: finish,
  stream_usage: usage,
  error,
}));
