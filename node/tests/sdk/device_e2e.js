#!/usr/bin/env node
// Black-box test: the official Node device SDK (azure-iot-device 1.18.4 + azure-iot-device-mqtt 1.16.4),
// unmodified, against Meridian's MQTT device endpoint; azure-iothub 1.16.6 (Registry + Client, both REST
// for what is used here) drives the service side.
//
// Steps (each prints "ok <step>"): create_device, connect, telemetry, twin_reported, direct_method, close.
//
// Environment:
//   MERIDIAN_CONNECTION_STRING  required, service "HostName=localhost:PORT;SharedAccessKeyName=iothubowner;SharedAccessKey=..."
//   MERIDIAN_CA_CERT            required, PEM with the test CA. Given to the device client with
//                               client.setOptions({ ca }) and to the REST port shim's https.Agent.
//   NODE_EXTRA_CA_CERTS         only needed when HostName has no port (no shim then); Node reads it at
//                               process start, so the caller must set it (e.g. =$MERIDIAN_CA_CERT)
//   MERIDIAN_MQTT_PORT          required, the server's MQTT/TLS port. The device connection string gets
//                               GatewayHostName=<host>:<port>; azure-iot-device-mqtt dials
//                               mqtts://<GatewayHostName> and mqtt.js takes the port from that URI.
//   MERIDIAN_DEVICE_HOSTNAME    HostName of the device connection string (default: service HostName
//                               without its port, i.e. "localhost"); used in the MQTT username and SAS sr
//   MERIDIAN_TEST_PREFIX        id prefix (default "jsdev-<random>-")
//   MERIDIAN_NODE_MODULES       node_modules with the SDKs
//                               (default ${MERIDIAN_SDK_CACHE:-~/.cache/meridian-sdk}/node/node_modules, see setup.sh)
//   MERIDIAN_NODE_PORT_SHIM     "0" disables the REST port shim (see service_registry.js)
//
// Port shim (same as service_registry.js): azure-iothub passes the connection string's HostName verbatim
// as the https `host` option, so "HostName=localhost:8443" would make Node resolve "localhost:8443".
// When HostName carries a port, the Registry's and the Client's RestApiClient get an https.Agent that
// splits host:port before dialling; Host header, SAS sr and paths on the wire are unchanged.
// Client.invokeDeviceMethod is REST (POST /twins/{id}/methods?api-version=2021-04-12); the Client's AMQP
// transport is never opened.
//
// Output: "ok <step>" lines, one "SENT {json}" line per telemetry message (message_id, seq, device_id),
// then "PASS device_e2e.js".
// Exit codes: 0 all passed, 1 a step failed, 2 global timeout (90 s).
'use strict';

setTimeout(() => {
  console.error(`TIMEOUT: global 90 s timeout during step '${currentStep}'`);
  process.exit(2);
}, 90000).unref();

const crypto = require('crypto');
const fs = require('fs');
const https = require('https');
const net = require('net');
const os = require('os');
const path = require('path');

let currentStep = 'startup';

const nodeModules = process.env.MERIDIAN_NODE_MODULES ||
  path.join(process.env.MERIDIAN_SDK_CACHE || path.join(os.homedir(), '.cache', 'meridian-sdk'), 'node', 'node_modules');

function load(name) {
  try {
    return require(path.join(nodeModules, name));
  } catch (e) {
    if (e.code !== 'MODULE_NOT_FOUND') throw e;
    return require(name); // NODE_PATH / local node_modules fallback
  }
}

const { Registry, Client: ServiceClient } = load('azure-iothub');
const { Client: DeviceClient, Message } = load('azure-iot-device');
const { Mqtt } = load('azure-iot-device-mqtt');
const { NoRetry } = load('azure-iot-common');

const CONN = process.env.MERIDIAN_CONNECTION_STRING;
const CA_PATH = process.env.MERIDIAN_CA_CERT;
const MQTT_PORT = process.env.MERIDIAN_MQTT_PORT;
const PREFIX = process.env.MERIDIAN_TEST_PREFIX || 'jsdev-' + crypto.randomBytes(4).toString('hex') + '-';

class StepFailure extends Error {}

function ok(step) {
  console.log(`ok ${step}`);
}

function note(msg) {
  console.log(`note: ${msg}`);
}

function begin(step) {
  currentStep = step;
}

function check(cond, msg) {
  if (!cond) throw new StepFailure(`[${currentStep}] ${msg}`);
}

function eq(got, want, what) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  check(g === w, `${what}: got ${g}, want ${w}`);
}

// Bound a promise: the SDK calls themselves have no (or very long) timeouts.
function bounded(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new StepFailure(`[${currentStep}] ${what} did not complete within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function parseCs(cs) {
  const out = {};
  for (const part of cs.split(';')) {
    const i = part.indexOf('=');
    if (i > 0) out[part.slice(0, i)] = part.slice(i + 1);
  }
  return out;
}

// Same shim as service_registry.js, plus the test CA on the agent (so NODE_EXTRA_CA_CERTS is optional).
function hostPortShim(restApiClient, hostName, caPem) {
  const m = /^(.+):(\d+)$/.exec(hostName);
  if (!m || process.env.MERIDIAN_NODE_PORT_SHIM === '0') return false;
  const host = m[1];
  const port = Number(m[2]);
  class HostPortAgent extends https.Agent {
    createConnection(options, cb) {
      const o = Object.assign({}, options, { host, port });
      if (net.isIP(host)) delete o.servername; // no SNI for IP literals
      else o.servername = host;
      return super.createConnection(o, cb);
    }
  }
  const agentOptions = { keepAlive: true };
  if (caPem) agentOptions.ca = caPem;
  restApiClient.setOptions({ http: { agent: new HostPortAgent(agentOptions) } });
  return true;
}

// Client.invokeDeviceMethod with the callback form: (err, result = parsed response body, response).
function invokeEcho(serviceClient, deviceId, payload) {
  return new Promise((resolve, reject) => {
    serviceClient.invokeDeviceMethod(
      deviceId,
      { methodName: 'echo', payload, responseTimeoutInSeconds: 15 },
      (err, result, response) => (err ? reject(err) : resolve({ result, response })),
    );
  });
}

function describeError(err) {
  if (!err) return String(err);
  const status = err.response ? err.response.statusCode : undefined;
  return `${err.name || 'Error'}: ${err.message}${status ? ` (HTTP ${status}, body ${String(err.responseBody).slice(0, 300)})` : ''}`;
}

async function main() {
  for (const [name, val] of [['MERIDIAN_CONNECTION_STRING', CONN], ['MERIDIAN_CA_CERT', CA_PATH], ['MERIDIAN_MQTT_PORT', MQTT_PORT]]) {
    if (!val) {
      console.error(`${name} is not set`);
      return 1;
    }
  }
  const caPem = fs.readFileSync(CA_PATH, 'utf8');
  const svc = parseCs(CONN);
  const svcHost = svc.HostName;
  const hostOnly = svcHost.replace(/:\d+$/, '');
  const deviceHost = process.env.MERIDIAN_DEVICE_HOSTNAME || hostOnly;

  const registry = Registry.fromConnectionString(CONN);
  const serviceClient = ServiceClient.fromConnectionString(CONN); // AMQP transport stays closed
  serviceClient.setRetryPolicy(new NoRetry());
  const shimmed = hostPortShim(registry._restApiClient, svcHost, caPem);
  hostPortShim(serviceClient._restApiClient, svcHost, caPem);
  if (!shimmed && !process.env.NODE_EXTRA_CA_CERTS) {
    console.error('warning: HostName has no port and NODE_EXTRA_CA_CERTS is not set; REST TLS verification will likely fail');
  }
  note(`device HostName=${deviceHost} GatewayHostName=${hostOnly}:${MQTT_PORT} rest shim=${shimmed}`);

  const id = PREFIX + 'dev';
  let created = false;
  let client = null;
  try {
    // ------------------------------------------------------------ device + connect
    begin('create_device');
    const dev = (await bounded(30000, 'registry.create', registry.create({ deviceId: id, status: 'enabled' }))).responseBody;
    created = true;
    eq(dev.deviceId, id, 'deviceId');
    const pk = dev.authentication && dev.authentication.symmetricKey && dev.authentication.symmetricKey.primaryKey;
    check(!!pk, 'server did not generate a primary key');
    ok('create_device');

    begin('connect');
    const deviceCs = `HostName=${deviceHost};DeviceId=${id};SharedAccessKey=${pk};GatewayHostName=${hostOnly}:${MQTT_PORT}`;
    client = DeviceClient.fromConnectionString(deviceCs, Mqtt);
    client.setRetryPolicy(new NoRetry()); // fail fast instead of retrying for minutes
    const clientErrors = [];
    client.on('error', (err) => {
      clientErrors.push(err);
      console.error(`device client error event: ${describeError(err)}`);
    });
    await bounded(10000, 'setOptions({ca})', client.setOptions({ ca: caPem }));
    await bounded(20000, 'client.open()', client.open());
    // Register the method handler right after connecting (as an application would): the SDK subscribes
    // to $iothub/methods/POST/# in the background; by the direct_method step the SUBACK is long done.
    const methodCalls = [];
    client.onDeviceMethod('echo', (req, res) => {
      methodCalls.push({ name: req.methodName, payload: req.payload });
      res.send(200, { echo: req.payload }, (err) => {
        if (err) console.error(`method response send failed: ${describeError(err)}`);
      });
    });
    ok('connect');

    // ------------------------------------------------------------ telemetry
    begin('telemetry');
    const sent = [];
    for (let i = 0; i < 3; i++) {
      const msg = new Message(JSON.stringify({ seq: i }));
      msg.messageId = `${PREFIX}m${i}`;
      msg.correlationId = `${PREFIX}corr`;
      msg.contentType = 'application/json';
      msg.contentEncoding = 'utf-8';
      msg.properties.add('seq', String(i));
      msg.properties.add('needs encoding', 'a/b&c=d ü');
      await bounded(15000, `sendEvent #${i}`, client.sendEvent(msg));
      sent.push({ message_id: msg.messageId, seq: i, device_id: id });
    }
    for (const s of sent) console.log('SENT ' + JSON.stringify(s));
    ok('telemetry');

    // ------------------------------------------------------------ twin: get + reported patch
    begin('twin_reported');
    const twin = await bounded(15000, 'client.getTwin()', client.getTwin());
    check(twin && twin.properties, 'getTwin returned no properties');
    check(typeof twin.properties.desired.$version === 'number', `desired.$version missing: ${JSON.stringify(twin.properties.desired)}`);
    check(typeof twin.properties.reported.$version === 'number', `reported.$version missing: ${JSON.stringify(twin.properties.reported)}`);
    const reportedV0 = twin.properties.reported.$version;
    const key = PREFIX.replace(/[^A-Za-z0-9_-]/g, '_') || 'e2e';
    const patch = { fw: '1.2.3', [key]: { ok: true } };
    await bounded(15000, 'reported.update()', new Promise((resolve, reject) => {
      twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
    }));
    const st = (await bounded(30000, 'registry.getTwin', registry.getTwin(id))).responseBody;
    const rep = (st.properties && st.properties.reported) || {};
    eq(rep.fw, '1.2.3', 'service twin properties.reported.fw');
    eq(rep[key], { ok: true }, `service twin properties.reported[${key}]`);
    check(typeof rep.$version === 'number' && rep.$version > reportedV0,
      `reported $version must grow past ${reportedV0}, got ${rep.$version}`);
    ok('twin_reported');

    // ------------------------------------------------------------ direct method (service REST -> MQTT)
    begin('direct_method');
    let out;
    for (let attempt = 1; ; attempt++) {
      try {
        out = await bounded(30000, 'invokeDeviceMethod', invokeEcho(serviceClient, id, { x: 1 }));
        break;
      } catch (err) {
        const status = err && err.response ? err.response.statusCode : undefined;
        // 404 = device not (yet) subscribed to methods; allow the background SUBSCRIBE a few seconds.
        if (status === 404 && attempt < 5) {
          note(`invokeDeviceMethod attempt ${attempt}: ${describeError(err)}; retrying`);
          await sleep(1000);
          continue;
        }
        throw err;
      }
    }
    const result = typeof out.result === 'string' ? JSON.parse(out.result) : out.result;
    eq(result && result.status, 200, 'method result status');
    eq(result && result.payload, { echo: { x: 1 } }, 'method result payload');
    eq(methodCalls, [{ name: 'echo', payload: { x: 1 } }], 'method requests seen by the device');
    ok('direct_method');

    // ------------------------------------------------------------ close
    begin('close');
    await bounded(15000, 'client.close()', client.close());
    client = null;
    if (clientErrors.length) note(`device client emitted ${clientErrors.length} error event(s)`);
    ok('close');
  } finally {
    if (client) {
      try {
        await bounded(5000, 'cleanup close', client.close());
      } catch (_) {
        // best effort
      }
    }
    if (created) {
      try {
        await bounded(10000, 'cleanup delete', registry.delete(id));
      } catch (_) {
        // best effort
      }
    }
  }
  return 0;
}

main().then(
  (rc) => {
    if (rc === 0) console.log('PASS device_e2e.js');
    process.exit(rc);
  },
  (err) => {
    console.error(`FAIL device_e2e.js in step '${currentStep}'`);
    console.error(err && err.stack ? err.stack : err);
    if (err && err.response) console.error(describeError(err));
    process.exit(1);
  },
);
