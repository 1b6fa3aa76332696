// MQTT.js against a broker at mqtt://127.0.0.1:PORT (or ws://127.0.0.1:PORT/mqtt with --ws), at MQTT
// 3.1.1 and 5.0: pub/sub at QoS 0/1/2, retained messages (and clearing), wills, persistent sessions.
// Prints one JSON line per check ({"check": ..., "ok": bool, "detail": ...}) and exits 1 if any failed.
"use strict";
const mqtt = require("mqtt");

const port = Number(process.argv[2]);
const useWs = process.argv.includes("--ws");
const url = useWs ? `ws://127.0.0.1:${port}/mqtt` : `mqtt://127.0.0.1:${port}`;
const WAIT_MS = 5000;
let failed = 0;

function report(check, ok, detail) {
  if (!ok) failed += 1;
  console.log(JSON.stringify({ check, ok, detail: detail === undefined ? null : detail }));
}

function connect(clientId, version, extra = {}) {
  return new Promise((resolve, reject) => {
    const client = mqtt.connect(url, {
      clientId, protocolVersion: version, reconnectPeriod: 0, connectTimeout: WAIT_MS, ...extra,
    });
    client.once("connect", (ack) => resolve({ client, ack }));
    client.once("error", reject);
  });
}

function nextMessage(client, timeoutMs = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no message")), timeoutMs);
    client.once("message", (topic, payload, packet) => {
      clearTimeout(timer);
      resolve({ topic, payload: payload.toString(), packet });
    });
  });
}

async function level(version) {
  const tag = `v${version}`;
  const sub = (await connect(`js-sub-${tag}`, version)).client;
  const pub = (await connect(`js-pub-${tag}`, version)).client;
  for (const qos of [0, 1, 2]) {
    const topic = `js/${tag}/q${qos}`;
    await sub.subscribeAsync(topic, { qos });
    const got = nextMessage(sub);
    await pub.publishAsync(topic, `hello-${qos}`, { qos });
    const m = await got;
    report(`${tag} qos${qos} pub/sub`, m.payload === `hello-${qos}` && m.packet.qos === qos, m.payload);
  }

  // Retained: a late subscriber is greeted, then an empty retained message clears it.
  const rtopic = `js/${tag}/retained`;
  await pub.publishAsync(rtopic, "kept", { qos: 1, retain: true });
  const late = (await connect(`js-late-${tag}`, version)).client;
  const greeted = nextMessage(late);
  await late.subscribeAsync(rtopic, { qos: 1 });
  const g = await greeted;
  report(`${tag} retained greets a new subscriber`, g.payload === "kept" && g.packet.retain === true, g.payload);
  await pub.publishAsync(rtopic, "", { qos: 1, retain: true });
  const later = (await connect(`js-later-${tag}`, version)).client;
  await later.subscribeAsync(rtopic, { qos: 1 });
  let cleared = true;
  try { await nextMessage(later, 500); cleared = false; } catch (e) { /* nothing: cleared */ }
  report(`${tag} empty retained payload clears`, cleared);
  late.end(true);
  later.end(true);

  // Will: published when the client vanishes without DISCONNECT.
  const wtopic = `js/${tag}/will`;
  await sub.subscribeAsync(wtopic, { qos: 1 });
  const doomed = (await connect(`js-doomed-${tag}`, version,
                                { will: { topic: wtopic, payload: Buffer.from("gone"), qos: 1 } })).client;
  const willMsg = nextMessage(sub);
  doomed.stream.destroy();
  const w = await willMsg;
  report(`${tag} will on abnormal disconnect`, w.payload === "gone", w.payload);

  // Persistent session: QoS 1 messages sent while offline arrive on return.
  const ptopic = `js/${tag}/persist`;
  const sessionOpts = version === 5
    ? { clean: false, properties: { sessionExpiryInterval: 600 } } : { clean: false };
  const p1 = (await connect(`js-persist-${tag}`, version, sessionOpts)).client;
  await p1.subscribeAsync(ptopic, { qos: 1 });
  await p1.endAsync();
  for (let i = 0; i < 3; i++) await pub.publishAsync(ptopic, `offline-${i}`, { qos: 1 });
  const back = mqtt.connect(url, { clientId: `js-persist-${tag}`, protocolVersion: version, reconnectPeriod: 0,
                                   ...sessionOpts });
  const got = [];
  const present = await new Promise((resolve, reject) => {
    back.on("message", (_t, payload) => got.push(payload.toString()));
    back.once("connect", (ack) => resolve(ack.sessionPresent));
    back.once("error", reject);
  });
  const deadline = Date.now() + WAIT_MS;
  while (got.length < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  report(`${tag} persistent session keeps offline messages`,
         present === true && got.join(",") === "offline-0,offline-1,offline-2", { present, got });
  back.end(true);
  sub.end(true);
  pub.end(true);
}

(async () => {
  try {
    await level(4);
    await level(5);
  } catch (err) {
    report("run", false, String(err && err.stack ? err.stack : err));
  }
  process.exit(failed ? 1 : 0);
})();
