// A producer in another language, written from docs/wire-format.md alone.
//
//   node producer.mjs <nats url> <namespace> <schema dir> <id of a task Python enqueued>
//
// Enqueues Greet tasks (no key, a key twice, a priority lane, a bad body), publishes a Greeted event,
// validates every body it sends and every record it reads against the JSON Schema that
// `taskframe schema` wrote, checks the AsyncAPI document against the published AsyncAPI
// 3.0 schema, and waits for the results. Prints one JSON object; exits 1 on a failed check.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { connect, headers } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import Ajv07 from "ajv";
import Ajv2020 from "ajv/dist/2020.js";
import specs from "@asyncapi/specs";

const [url, ns, schemaDir, pythonId] = process.argv.slice(2);
const load = (path) => JSON.parse(readFileSync(join(schemaDir, path), "utf8"));
const ajv = new Ajv2020({ strict: false, allErrors: true });
const checker = (path) => ajv.compile(load(path));
const task = checker("tasks/greetings/Greet.json");
const result = checker("results/greetings/Greet.json");
const event = checker("events/greeting.sent.json");
const status = checker("status.json");
const FINAL = new Set(["succeeded", "dead", "cancelled"]);

function check(validate, value, what) {
  if (!validate(value)) {
    throw new Error(`${what} does not match its schema: ${JSON.stringify(validate.errors)}`);
  }
  return value;
}

const asyncapi = new Ajv07({ strict: false, validateFormats: false, allErrors: true, meta: false, validateSchema: false })
  .compile(specs.schemas["3.0.0"]);
check(asyncapi, load("asyncapi.json"), "asyncapi.json");

const nc = await connect({ servers: url });
const js = jetstream(nc);
const encode = (value) => JSON.stringify(value);

// Only the subject and the body are required; the id is then <queue>-<stream sequence>.
async function enqueue(body, { key, lane } = {}) {
  check(task, body, "the task body");
  const subject = `${ns}.tasks.greetings.Greet${lane ? `.${lane}` : ""}`;
  const h = headers();
  if (key) h.set("Nats-Msg-Id", key); // the key is the task id
  const ack = await js.publish(subject, encode(body), { headers: h });
  return { id: key ?? `greetings-${ack.seq}`, duplicate: ack.duplicate };
}

const plain = await enqueue({ name: "plain" });
const keyed = await enqueue({ name: "keyed" }, { key: "order-x" });
const again = await enqueue({ name: "keyed" }, { key: "order-x" });
const high = await enqueue({ name: "high" }, { lane: "high" });
// A body the schema refuses, sent anyway: a worker dead-letters it, reason "invalid".
const bad = { name: 42 };
if (task(bad)) throw new Error("the task schema accepted a number as name");
const badHeaders = headers();
badHeaders.set("Nats-Msg-Id", "bad-1");
await js.publish(`${ns}.tasks.greetings.Greet`, encode(bad), { headers: badHeaders });

const greeted = { name: "event" };
check(event, greeted, "the event body");
const eh = headers();
eh.set("Nats-Msg-Id", "greeted-1");
await js.publish(`${ns}.events.greeting.sent`, encode(greeted), { headers: eh });

// Watch the key (last value, then updates) until a final record arrives.
const kv = await new Kvm(js).open(`TF_${ns}_results`);
async function final(id) {
  const watch = await kv.watch({ key: id });
  for await (const entry of watch) {
    if (entry.operation !== "PUT") continue;
    const record = check(status, entry.json(), `the record of ${id}`);
    if (FINAL.has(record.state)) {
      watch.stop();
      if (record.state === "succeeded") check(result, record.result, `the result of ${id}`);
      return record;
    }
  }
  throw new Error(`the watch of ${id} ended`);
}

const ids = {
  plain: plain.id,
  keyed: keyed.id,
  high: high.id,
  python: pythonId,
  event: "after-greeted-1",
  bad: "bad-1",
};
const records = {};
await Promise.all(Object.entries(ids).map(async ([name, id]) => {
  records[name] = await final(id);
}));
await nc.close();
console.log(JSON.stringify({ ids, duplicate: again.duplicate, againId: again.id, records }));
