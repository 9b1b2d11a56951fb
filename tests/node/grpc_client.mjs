// A Node gRPC client of llmserve built from the contract alone: proto/ compiled
// into build/proto/llmserve.binpb (a FileDescriptorSet with its imports) by
// proto/generate.py. Prints one JSON object with what it saw.
import { readFileSync } from "node:fs";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, imagePath] = process.argv.slice(2);
const definition = protoLoader.loadFileDescriptorSetFromBuffer(readFileSync(imagePath), {
  keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
});
const { ChatService } = grpc.loadPackageDefinition(definition).llmserve.v1;
const client = new ChatService(address, grpc.credentials.createInsecure());
const request = { model: "demo", messages: [{ role: "user", content: "Hello from Node" }],
                  max_tokens: 12, seed: "42", ignore_eos: true };

const unary = () => new Promise((resolve, reject) =>
  client.CreateChatCompletion(request, (err, reply) => (err ? reject(err) : resolve(reply))));

const stream = () => new Promise((resolve, reject) => {
  const chunks = [];
  const call = client.StreamChatCompletion({ ...request, stream_options: { include_usage: true } });
  call.on("data", (c) => chunks.push(c));
  call.on("error", reject);
  call.on("end", () => resolve(chunks));
});

const invalid = () => new Promise((resolve) =>
  client.CreateChatCompletion({ ...request, temperature: 9 }, (err) => resolve(err)));

const reply = await unary();
const chunks = await stream();
const err = await invalid();
const text = chunks.flatMap((c) => c.choices ?? []).map((c) => c.delta?.content ?? "").join("");
console.log(JSON.stringify({
  unary_text: reply.choices[0].message.content,
  unary_finish: reply.choices[0].finish_reason,
  unary_usage: reply.usage,
  stream_text: text,
  stream_first_role: chunks[0].choices[0].delta.role,
  stream_usage: chunks[chunks.length - 1].usage,
  invalid_code: err?.code,
  invalid_details: err?.details,
}));
client.close();
