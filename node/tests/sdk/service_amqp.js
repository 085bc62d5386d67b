#!/usr/bin/env node
// Black-box test of Meridian's AMQP endpoint with the official Node clients, unmodified:
// azure-iothub 1.16.6 Client.send (AMQP, no SASL layer) to a device connected over MQTT with
// azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4, the feedback receiver (iothub-ack=full),
// and @azure/event-hubs 6.0.4 reading the telemetry from the Event Hub-compatible endpoint.
//
// Steps (each prints "ok <step>"): open, c2d_with_feedback, c2d_unknown_device, telemetry,
// eh_properties, eh_from_start, eh_from_offset, eh_from_enqueued_time, eh_websocket, eh_wrong_key.
//
// Environment (all required):
//   MERIDIAN_CONNECTION_STRING  service connection string "HostName=localhost:<https port>;..." (the
//                               client dials AMQP on that port; Meridian serves AMQP there too)
//   MERIDIAN_SERVICE_KEY        the `service` policy's key (Event Hub-compatible connection string)
//   MERIDIAN_DEVICE_ID, MERIDIAN_DEVICE_KEY   a registered device
//   MERIDIAN_CA_CERT            PEM of the test CA (NODE_EXTRA_CA_CERTS must name it too)
//   MERIDIAN_MQTT_PORT          MQTT/TLS port (GatewayHostName=localhost:<port>)
//   MERIDIAN_HTTPS_PORT         HTTPS (and AMQP) port
//   MERIDIAN_EVENT_HUB          the Event Hub-compatible name
//   MERIDIAN_NODE_MODULES       node_modules with the SDKs
// Exit codes: 0 passed, 1 a step failed, 2 global timeout (150 s).
'use strict';

let step = 'startup';
setTimeout(() => {
  console.error(`TIMEOUT during step '${step}'`);
  process.exit(2);
}, 150000).unref();

const fs = require('fs');
const path = require('path');
const os = require('os');
const nodeModules = process.env.MERIDIAN_NODE_MODULES
  || path.join(process.env.MERIDIAN_SDK_CACHE || path.join(os.homedir(), '.cache', 'meridian-sdk'), 'node', 'node_modules');
const req = (name) => require(path.join(nodeModules, name));

const { Client } = req('azure-iothub');
const { Message } = req('azure-iot-common');
const device = req('azure-iot-device');
const { Mqtt } = req('azure-iot-device-mqtt');
const { EventHubConsumerClient, earliestEventPosition } = req('@azure/event-hubs');

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is required`);
  return v;
};
const CS = env('MERIDIAN_CONNECTION_STRING');
const SERVICE_KEY = env('MERIDIAN_SERVICE_KEY');
const DEVICE_ID = env('MERIDIAN_DEVICE_ID');
const DEVICE_KEY = env('MERIDIAN_DEVICE_KEY');
const CA = fs.readFileSync(env('MERIDIAN_CA_CERT'), 'utf8');
const MQTT_PORT = env('MERIDIAN_MQTT_PORT');
const HTTPS_PORT = env('MERIDIAN_HTTPS_PORT');
const EVENT_HUB = env('MERIDIAN_EVENT_HUB');
const PREFIX = `jsamqp-${Math.random().toString(16).slice(2, 8)}-`;

function ok(s) { console.log(`ok ${s}`); }
function check(cond, msg) { if (!cond) throw new Error(`${step}: ${msg}`); }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
function within(ms, what, promise) {
  return Promise.race([promise, sleep(ms).then(() => { throw new Error(`${step}: ${what} timed out`); })]);
}
const cb = (fn) => new Promise((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res))));

function ehClient(key = SERVICE_KEY) {
  return new EventHubConsumerClient('$Default',
    `Endpoint=sb://localhost:${HTTPS_PORT}/;SharedAccessKeyName=service;SharedAccessKey=${key};EntityPath=${EVENT_HUB}`);
}

function seqOf(e) { return JSON.parse(e.body.slice(PREFIX.length)).seq; }

// Subscribes until `done(events)` holds; returns our events (bodies with PREFIX).
async function collect(partitionId, options, done) {
  const client = ehClient();
  const events = [];
  let resolveDone;
  const finished = new Promise((r) => { resolveDone = r; });
  const handlers = {
    processEvents: async (batch, context) => {
      for (const e of batch) {
        e.partition = context.partitionId;
        if (typeof e.body === 'string' && e.body.startsWith(PREFIX)) events.push(e);
        else if (Buffer.isBuffer(e.body) && e.body.toString().startsWith(PREFIX)) {
          e.body = e.body.toString();
          events.push(e);
        }
      }
      if (done(events)) resolveDone();
    },
    processError: async (err) => { console.error(`processError: ${err.message}`); },
  };
  const sub = partitionId === undefined
    ? client.subscribe(handlers, { ...options, maxWaitTimeInSeconds: 1 })
    : client.subscribe(partitionId, handlers, { ...options, maxWaitTimeInSeconds: 1 });
  try {
    await within(40000, `events (${events.length} so far)`, finished);
  } finally {
    await sub.close();
    await client.close();
  }
  return events;
}

async function main() {
  step = 'open';
  const service = Client.fromConnectionString(CS);
  await cb((done) => service.open(done));
  const dev = device.Client.fromConnectionString(
    `HostName=localhost;DeviceId=${DEVICE_ID};SharedAccessKey=${DEVICE_KEY};GatewayHostName=localhost:${MQTT_PORT}`, Mqtt);
  dev.setOptions({ ca: CA });
  const received = [];
  dev.on('message', (msg) => {
    received.push(msg);
    dev.complete(msg, () => {});
  });
  await dev.open();
  const feedback = [];
  const abandoned = new Set();
  const receiver = await cb((done) => service.getFeedbackReceiver(done));
  receiver.on('message', (msg) => {
    const records = JSON.parse(msg.data.toString());
    feedback.push(...records);
    // The first batch is abandoned (released): it must come back, then it is completed.
    const key = records.map((r) => r.originalMessageId).join(',');
    if (!abandoned.has(key) && abandoned.size === 0) {
      abandoned.add(key);
      receiver.abandon(msg, () => {});
    } else {
      receiver.complete(msg, () => {});
    }
  });
  ok('open');

  step = 'c2d_with_feedback';
  const mid = `${PREFIX}c2d`;
  const m = new Message('hello from node over amqp');
  m.messageId = mid;
  m.ack = 'full';
  m.properties.add('color', 'green');
  await cb((done) => service.send(DEVICE_ID, m, done));
  for (let i = 0; i < 200 && !received.some((r) => r.messageId === mid); i++) await sleep(100);
  const got = received.find((r) => r.messageId === mid);
  check(got, 'the device got no message');
  check(got.data.toString() === 'hello from node over amqp', `body ${got.data}`);
  check(got.properties.getValue('color') === 'green', 'property color');
  for (let i = 0; i < 300 && !feedback.some((f) => f.originalMessageId === mid); i++) await sleep(100);
  const fb = feedback.find((f) => f.originalMessageId === mid);
  check(fb, `no feedback for ${mid}: ${JSON.stringify(feedback)}`);
  check(fb.statusCode === 'Success' && fb.deviceId === DEVICE_ID, `feedback ${JSON.stringify(fb)}`);
  // Abandoned once, delivered again.
  for (let i = 0; i < 300 && feedback.filter((f) => f.originalMessageId === mid).length < 2; i++) await sleep(100);
  check(feedback.filter((f) => f.originalMessageId === mid).length >= 2,
    `the abandoned feedback did not come back: ${JSON.stringify(feedback)}`);
  ok('c2d_with_feedback');

  step = 'c2d_unknown_device';
  let refused = null;
  try {
    await cb((done) => service.send(`${PREFIX}nobody`, new Message('x'), done));
  } catch (e) {
    refused = e;
  }
  check(refused, 'a send to an unknown device succeeded');
  console.log(`unknown device -> ${refused.name}: ${refused.message}`);
  ok('c2d_unknown_device');
  await cb((done) => service.close(done));

  step = 'telemetry';
  const n = 10;
  for (let i = 0; i < n; i++) {
    const t = new device.Message(PREFIX + JSON.stringify({ seq: i }));
    t.messageId = `${PREFIX}${i}`;
    t.contentType = 'application/json';
    t.contentEncoding = 'utf-8';
    t.properties.add('seq', String(i));
    await dev.sendEvent(t);
    // A millisecond apart at least: the Node SDK's enqueuedOn position means "after this time"
    // (x-opt-enqueued-time >), and the checks below need the 8th event after the 7th.
    await sleep(3);
  }
  ok('telemetry');

  step = 'eh_properties';
  const c = ehClient();
  const props = await c.getEventHubProperties();
  check(props.name === EVENT_HUB, `name ${props.name}`);
  check(props.partitionIds.length >= 1, 'partition ids');
  for (const id of props.partitionIds) {
    const pp = await c.getPartitionProperties(id);
    check(pp.partitionId === id, `partition ${JSON.stringify(pp)}`);
  }
  await c.close();
  ok('eh_properties');

  step = 'eh_from_start';
  const all = await collect(undefined, { startPosition: earliestEventPosition }, (es) => es.length >= n);
  const seqs = all.map(seqOf).sort((a, b) => a - b);
  check(JSON.stringify(seqs) === JSON.stringify([...Array(n).keys()]), `seqs ${seqs}`);
  const first = all[0];
  check(first.systemProperties['iothub-connection-device-id'] === DEVICE_ID,
    `system properties ${JSON.stringify(first.systemProperties)}`);
  check(first.properties.seq === String(seqOf(first)), `properties ${JSON.stringify(first.properties)}`);
  check(first.contentType === 'application/json', `content type ${first.contentType}`);
  check(first.enqueuedTimeUtc instanceof Date, 'enqueued time');
  ok('eh_from_start');

  const bySeq = new Map(all.map((e) => [seqOf(e), e]));
  // One device's events share its partition.
  const pid = bySeq.get(4).partition;
  check(all.every((e) => e.partition === pid), 'the device\'s events span partitions');

  step = 'eh_from_offset';
  const fourth = bySeq.get(4);
  const afterOffset = await collect(pid, { startPosition: { offset: fourth.offset } },
    (es) => es.some((e) => seqOf(e) === n - 1));
  check(JSON.stringify(afterOffset.map(seqOf)) === JSON.stringify([5, 6, 7, 8, 9]),
    `after offset: ${afterOffset.map(seqOf)}`);
  ok('eh_from_offset');

  step = 'eh_from_enqueued_time';
  const seventh = bySeq.get(7);
  const fromTime = await collect(pid, { startPosition: { enqueuedOn: seventh.enqueuedTimeUtc } },
    (es) => es.some((e) => seqOf(e) === n - 1));
  const ts = fromTime.map(seqOf);
  check(ts[0] <= 8 && ts[ts.length - 1] === n - 1, `from time: ${ts}`);
  check(fromTime.every((e) => e.enqueuedTimeUtc >= seventh.enqueuedTimeUtc), 'an earlier event');
  ok('eh_from_enqueued_time');

  step = 'eh_websocket';
  // AMQP over WebSockets (wss://localhost:<port>/$servicebus/websocket, subprotocol AMQPWSB10).
  const WebSocket = req('ws');
  const wsClient = new EventHubConsumerClient('$Default',
    `Endpoint=sb://localhost:${HTTPS_PORT}/;SharedAccessKeyName=service;SharedAccessKey=${SERVICE_KEY};EntityPath=${EVENT_HUB}`,
    { webSocketOptions: { webSocket: WebSocket, webSocketConstructorOptions: { ca: CA } } });
  const wsProps = await wsClient.getEventHubProperties();
  check(wsProps.name === EVENT_HUB, `websocket name ${wsProps.name}`);
  const overWs = [];
  let wsDone;
  const wsFinished = new Promise((r) => { wsDone = r; });
  const wsSub = wsClient.subscribe(pid, {
    processEvents: async (batch) => {
      for (const e of batch) {
        const body = Buffer.isBuffer(e.body) ? e.body.toString() : String(e.body);
        if (body.startsWith(PREFIX)) overWs.push(e);
      }
      if (overWs.length >= n) wsDone();
    },
    processError: async () => {},
  }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 });
  await within(40000, `events over websockets (${overWs.length})`, wsFinished);
  await wsSub.close();
  await wsClient.close();
  ok('eh_websocket');

  step = 'eh_wrong_key';
  const bad = ehClient('A'.repeat(43) + '=');
  let failed = null;
  try {
    await within(60000, 'the refusal', bad.getEventHubProperties({ abortSignal: AbortSignal.timeout(30000) }));
  } catch (e) {
    failed = e;
  }
  await bad.close();
  check(failed, 'a wrong key was accepted');
  ok('eh_wrong_key');

  await dev.close();
  console.log('PASS service_amqp.js');
}

main().then(() => process.exit(0), (e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
