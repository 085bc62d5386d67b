#!/usr/bin/env node
// Black-box test of Meridian's device-side AMQP with the official Node device SDK, unmodified:
// azure-iot-device 1.18.4 + azure-iot-device-amqp 1.14.4 (AMQP over TLS, no SASL, CBS device
// token), with azure-iothub 1.16.6 (AMQP C2D + feedback; REST twin and methods) and
// @azure/event-hubs 6.0.4 (reads the telemetry back) on the service side.
//
// Steps (each prints "ok <step>"): connect, telemetry, c2d_complete, c2d_reject, c2d_abandon,
// twin_get_and_reported, desired_patch, direct_method, close.
//
// Environment (all required): MERIDIAN_CONNECTION_STRING (service, HostName=localhost:<https>),
// MERIDIAN_SERVICE_KEY, MERIDIAN_DEVICE_ID, MERIDIAN_DEVICE_KEY, MERIDIAN_CA_CERT (also in
// NODE_EXTRA_CA_CERTS), MERIDIAN_HTTPS_PORT (AMQP is served there too: the device dials
// GatewayHostName=localhost:<port>), MERIDIAN_EVENT_HUB, MERIDIAN_NODE_MODULES.
// Exit codes: 0 passed, 1 a step failed, 2 global timeout (150 s).
'use strict';

let step = 'startup';
setTimeout(() => {
  console.error(`TIMEOUT during step '${step}'`);
  process.exit(2);
}, 150000).unref();

const fs = require('fs');
const https = require('https');
const net = require('net');
const path = require('path');
const req = (name) => require(path.join(process.env.MERIDIAN_NODE_MODULES, name));

const { Client: ServiceClient, Registry } = req('azure-iothub');
const { Message: ServiceMessage } = req('azure-iot-common');
const device = req('azure-iot-device');
const { Amqp } = req('azure-iot-device-amqp');
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
const HTTPS_PORT = env('MERIDIAN_HTTPS_PORT');
const EVENT_HUB = env('MERIDIAN_EVENT_HUB');
const PREFIX = `devamqp-${Math.random().toString(16).slice(2, 8)}-`;

function ok(s) { console.log(`ok ${s}`); }
function check(cond, msg) { if (!cond) throw new Error(`${step}: ${msg}`); }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const cb = (fn) => new Promise((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res))));
async function until(what, pred, ms = 20000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const v = pred();
    if (v) return v;
    await sleep(100);
  }
  throw new Error(`${step}: ${what} timed out`);
}

// azure-iothub's REST client passes HostName verbatim as the https host: dial host:port ourselves.
function hostPortShim(restApiClient, hostName) {
  const m = /^(.+):(\d+)$/.exec(hostName);
  if (!m) return;
  const [host, port] = [m[1], Number(m[2])];
  class HostPortAgent extends https.Agent {
    createConnection(options, done) {
      const o = Object.assign({}, options, { host, port });
      if (!net.isIP(host)) o.servername = host;
      return super.createConnection(o, done);
    }
  }
  restApiClient.setOptions({ http: { agent: new HostPortAgent({ keepAlive: true, ca: CA }) } });
}

async function main() {
  step = 'connect';
  const hostName = /HostName=([^;]+)/.exec(CS)[1];
  const service = ServiceClient.fromConnectionString(CS);
  hostPortShim(service._restApiClient, hostName);
  const registry = Registry.fromConnectionString(CS);
  hostPortShim(registry._restApiClient, hostName);
  await cb((done) => service.open(done));
  const feedback = [];
  const fbReceiver = await cb((done) => service.getFeedbackReceiver(done));
  fbReceiver.on('message', (msg) => {
    feedback.push(...JSON.parse(msg.data.toString()));
    fbReceiver.complete(msg, () => {});
  });

  const dev = device.Client.fromConnectionString(
    `HostName=localhost;DeviceId=${DEVICE_ID};SharedAccessKey=${DEVICE_KEY};GatewayHostName=localhost:${HTTPS_PORT}`, Amqp);
  dev.setOptions({ ca: CA });
  await dev.open();
  ok('connect');

  step = 'telemetry';
  const n = 5;
  for (let i = 0; i < n; i++) {
    const t = new device.Message(PREFIX + JSON.stringify({ seq: i }));
    t.messageId = `${PREFIX}${i}`;
    t.contentType = 'application/json';
    t.contentEncoding = 'utf-8';
    t.properties.add('seq', String(i));
    await dev.sendEvent(t);
  }
  const eh = new EventHubConsumerClient('$Default',
    `Endpoint=sb://localhost:${HTTPS_PORT}/;SharedAccessKeyName=service;SharedAccessKey=${SERVICE_KEY};EntityPath=${EVENT_HUB}`);
  const events = [];
  const sub = eh.subscribe({
    processEvents: async (batch) => {
      for (const e of batch) {
        const body = Buffer.isBuffer(e.body) ? e.body.toString() : String(e.body);
        if (body.startsWith(PREFIX)) events.push(e);
      }
    },
    processError: async () => {},
  }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 });
  await until('the events', () => events.length >= n, 40000);
  await sub.close();
  await eh.close();
  const e0 = events[0];
  check(e0.systemProperties['iothub-connection-device-id'] === DEVICE_ID,
    `system properties ${JSON.stringify(e0.systemProperties)}`);
  check(e0.properties.seq !== undefined, `properties ${JSON.stringify(e0.properties)}`);
  check(e0.contentType === 'application/json', `content type ${e0.contentType}`);
  check(String(e0.messageId).startsWith(PREFIX), `message id ${e0.messageId}`);
  ok('telemetry');

  // C2D: complete, reject, abandon (then complete on redelivery), each with full feedback.
  const received = [];
  const decide = new Map();
  dev.on('message', (msg) => {
    received.push(msg);
    const what = decide.get(msg.messageId) || 'complete';
    if (what === 'abandon-once') {
      decide.set(msg.messageId, 'complete');
      dev.abandon(msg, () => {});
    } else if (what === 'reject') {
      dev.reject(msg, () => {});
    } else {
      dev.complete(msg, () => {});
    }
  });
  async function c2d(label, decision, wantStatus) {
    step = `c2d_${label}`;
    const mid = `${PREFIX}${label}`;
    decide.set(mid, decision);
    const m = new ServiceMessage(`c2d ${label}`);
    m.messageId = mid;
    m.ack = 'full';
    m.properties.add('kind', label);
    await cb((done) => service.send(DEVICE_ID, m, done));
    const got = await until('the message', () => received.find((r) => r.messageId === mid));
    check(got.data.toString() === `c2d ${label}`, `body ${got.data}`);
    check(got.properties.getValue('kind') === label, 'property kind');
    const fb = await until(`feedback for ${mid}`, () => feedback.find((f) => f.originalMessageId === mid), 30000);
    check(fb.statusCode === wantStatus, `feedback ${JSON.stringify(fb)}`);
    return received.filter((r) => r.messageId === mid).length;
  }
  await c2d('complete', 'complete', 'Success');
  ok('c2d_complete');
  await c2d('reject', 'reject', 'Rejected');
  ok('c2d_reject');
  const deliveries = await c2d('abandon', 'abandon-once', 'Success');
  check(deliveries === 2, `abandoned message delivered ${deliveries} times`);
  ok('c2d_abandon');

  step = 'twin_get_and_reported';
  const twin = await dev.getTwin();
  check(twin.properties && twin.properties.reported, 'twin has no reported section');
  await new Promise((resolve, reject) => twin.properties.reported.update({ amqpProbe: PREFIX }, (err) => (err ? reject(err) : resolve())));
  const serviceTwin = (await cb((done) => registry.getTwin(DEVICE_ID, done)));
  check(serviceTwin.properties.reported.amqpProbe === PREFIX,
    `service sees reported ${JSON.stringify(serviceTwin.properties.reported)}`);
  ok('twin_get_and_reported');

  step = 'desired_patch';
  const patches = [];
  twin.on('properties.desired', (patch) => patches.push(patch));
  await sleep(500);
  await cb((done) => registry.updateTwin(DEVICE_ID, { properties: { desired: { target: 42 } } }, serviceTwin.etag, done));
  await until('the desired patch', () => patches.find((p) => p.target === 42));
  ok('desired_patch');

  step = 'direct_method';
  dev.onDeviceMethod('echo', (request, response) => {
    response.send(201, { echoed: request.payload }, () => {});
  });
  await sleep(500);
  const result = await new Promise((resolve, reject) => service.invokeDeviceMethod(DEVICE_ID,
    { methodName: 'echo', payload: { x: 7 }, responseTimeoutInSeconds: 15 },
    (err, res) => (err ? reject(err) : resolve(res))));
  check(result.status === 201, `status ${JSON.stringify(result)}`);
  check(result.payload && result.payload.echoed && result.payload.echoed.x === 7, `payload ${JSON.stringify(result)}`);
  ok('direct_method');

  step = 'close';
  await dev.close();
  await cb((done) => service.close(done));
  ok('close');
  console.log('PASS device_amqp.js');
}

main().then(() => process.exit(0), (e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
