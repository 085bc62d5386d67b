#!/usr/bin/env node
// Black-box test: the official Node service SDK (azure-iothub 1.16.6) Registry against Meridian.
//
// Environment:
//   MERIDIAN_CONNECTION_STRING  required, "HostName=localhost:PORT;SharedAccessKeyName=iothubowner;SharedAccessKey=..."
//   NODE_EXTRA_CA_CERTS         PEM with the test CA. Node reads it only at process start, so the CALLER
//                               must set it when spawning node (e.g. NODE_EXTRA_CA_CERTS=$MERIDIAN_CA_CERT);
//                               it cannot be set from inside this script. MERIDIAN_CA_CERT is only
//                               used to warn when NODE_EXTRA_CA_CERTS is missing.
//   MERIDIAN_TEST_PREFIX        device id prefix (default "sdkjs-<random>")
//   MERIDIAN_NODE_MODULES       node_modules holding azure-iothub
//                               (default ${MERIDIAN_SDK_CACHE:-~/.cache/meridian-sdk}/node/node_modules, see setup.sh)
//   MERIDIAN_NODE_PORT_SHIM     "0" disables the port shim described below (default on)
//
// Port shim: azure-iothub passes the connection string's HostName verbatim as the https `host`
// option, so "HostName=localhost:8443" makes Node resolve the name "localhost:8443" (ENOTFOUND);
// the Node service SDK can only reach port 443. When HostName carries a port, this script gives
// the SDK's REST client an https.Agent that splits host:port before dialling. Everything else on
// the wire is unchanged: Host header "localhost:8443", SAS sr=localhost%3A8443, same paths/bodies.
// With a port-less HostName (server on 443) no shim is installed.
//
// Output: one "ok <step>" line per passed step, then "PASS service_registry.js".
// Exit codes: 0 all passed, 1 a step failed, 2 global timeout (60 s).
'use strict';

setTimeout(() => {
  console.error(`TIMEOUT: global 60 s timeout during step '${currentStep}'`);
  process.exit(2);
}, 60000).unref();

const crypto = require('crypto');
const https = require('https');
const net = require('net');
const os = require('os');
const path = require('path');

let currentStep = 'startup';

function loadSdk() {
  const cache = process.env.MERIDIAN_SDK_CACHE || path.join(os.homedir(), '.cache', 'meridian-sdk');
  const nodeModules = process.env.MERIDIAN_NODE_MODULES || path.join(cache, 'node', 'node_modules');
  try {
    return require(path.join(nodeModules, 'azure-iothub'));
  } catch (e) {
    if (e.code !== 'MODULE_NOT_FOUND') throw e;
    return require('azure-iothub'); // NODE_PATH / local node_modules fallback
  }
}

const { Registry } = loadSdk();

const CONN = process.env.MERIDIAN_CONNECTION_STRING;
const PREFIX = process.env.MERIDIAN_TEST_PREFIX || 'sdkjs-' + crypto.randomBytes(4).toString('hex');

class StepFailure extends Error {}

function ok(step) {
  console.log(`ok ${step}`);
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

function statusOf(err) {
  return err && err.response ? err.response.statusCode : undefined;
}

// Await `promise`, require it to reject with an HTTP error of status `code`
// (azure-iothub errors carry .response = IncomingMessage and .responseBody = raw body text).
async function expectStatus(code, promise) {
  let result;
  try {
    result = await promise;
  } catch (err) {
    const got = statusOf(err);
    if (got === undefined) {
      throw new StepFailure(`[${currentStep}] expected HTTP ${code}, got error without HTTP status: ${err && err.stack}`);
    }
    if (got !== code) {
      throw new StepFailure(`[${currentStep}] expected HTTP ${code}, got ${got} (${err.name}; body ${String(err.responseBody).slice(0, 300)})`);
    }
    return err;
  }
  throw new StepFailure(`[${currentStep}] expected HTTP ${code}, but the call succeeded: ${JSON.stringify(result && result.responseBody)}`);
}

function hostPortShim(registry, hostName) {
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
  // RestApiClient.setOptions is what the Registry constructor itself uses to install its agent.
  registry._restApiClient.setOptions({ http: { agent: new HostPortAgent({ keepAlive: true }) } });
  return true;
}

async function main() {
  if (!CONN) {
    console.error('MERIDIAN_CONNECTION_STRING is not set');
    return 1;
  }
  if (process.env.MERIDIAN_CA_CERT && !process.env.NODE_EXTRA_CA_CERTS) {
    console.error('warning: MERIDIAN_CA_CERT is set but NODE_EXTRA_CA_CERTS is not; TLS verification will likely fail');
  }
  const hostName = (/(?:^|;)HostName=([^;]+)/.exec(CONN) || [])[1];
  const registry = Registry.fromConnectionString(CONN);
  if (hostPortShim(registry, hostName)) {
    console.log(`note: HostName ${hostName} has a port; using the host:port agent shim`);
  }

  const id = PREFIX + '-dev';
  let deleted = false;
  try {
    begin('create');
    const created = (await registry.create({ deviceId: id, status: 'enabled' })).responseBody;
    eq(created.deviceId, id, 'deviceId');
    eq(created.status, 'enabled', 'status');
    check(!!created.etag, `etag missing: ${created.etag}`);
    eq(created.connectionState, 'Disconnected', 'connectionState');
    check(created.authentication && created.authentication.symmetricKey, 'no authentication.symmetricKey');
    const pk = created.authentication.symmetricKey.primaryKey;
    const sk = created.authentication.symmetricKey.secondaryKey;
    check(!!pk && !!sk && pk !== sk, `server must generate two distinct keys, got ${pk} / ${sk}`);
    ok('create');

    begin('create_conflict_409');
    const dup = await expectStatus(409, registry.create({ deviceId: id, status: 'enabled' }));
    eq(dup.name, 'DeviceAlreadyExistsError', 'error class for 409');
    ok('create_conflict_409');

    begin('get');
    const got = (await registry.get(id)).responseBody;
    eq(got.deviceId, id, 'deviceId');
    eq(got.etag, created.etag, 'etag');
    eq(got.authentication.symmetricKey, created.authentication.symmetricKey, 'keys');
    ok('get');

    begin('update');
    // Registry.update always sends If-Match: "*" (the etag in the body is not used for concurrency).
    const updated = (await registry.update({
      deviceId: id,
      status: 'disabled',
      etag: got.etag,
      authentication: got.authentication,
    })).responseBody;
    eq(updated.deviceId, id, 'deviceId');
    eq(updated.status, 'disabled', 'status');
    check(!!updated.etag && updated.etag !== got.etag, `etag must change: old ${got.etag} new ${updated.etag}`);
    eq(updated.authentication.symmetricKey, got.authentication.symmetricKey, 'keys after update');
    eq((await registry.get(id)).responseBody.status, 'disabled', 'status re-read');
    ok('update');

    begin('getTwin');
    const twin = (await registry.getTwin(id)).responseBody;
    eq(twin.deviceId, id, 'twin deviceId');
    check(!!twin.etag && twin.etag !== '*', `twin etag missing (SDK defaults it to "*"): ${twin.etag}`);
    eq(twin.tags, {}, 'tags'); // SDK Twin defaults missing tags to {}
    check(twin.properties && twin.properties.desired, 'no properties.desired');
    eq(twin.properties.desired.$version, 1, 'desired $version');
    ok('getTwin');

    begin('updateTwin');
    const t2 = (await registry.updateTwin(id, { tags: { site: 'a' } }, twin.etag)).responseBody;
    eq(t2.deviceId, id, 'twin deviceId');
    eq(t2.tags, { site: 'a' }, 'tags');
    check(!!t2.etag && t2.etag !== twin.etag, `twin etag must change: old ${twin.etag} new ${t2.etag}`);
    eq((await registry.getTwin(id)).responseBody.tags, { site: 'a' }, 'tags re-read');
    ok('updateTwin');

    begin('updateTwin_stale_etag_412');
    const stale = await expectStatus(412, registry.updateTwin(id, { tags: { site: 'stale' } }, twin.etag));
    eq(stale.name, 'InvalidEtagError', 'error class for 412');
    eq((await registry.getTwin(id)).responseBody.tags, { site: 'a' }, 'tags after rejected patch');
    ok('updateTwin_stale_etag_412');

    begin('list');
    const list = (await registry.list()).responseBody;
    check(Array.isArray(list), `list returned ${typeof list}`);
    check(list.some((d) => d.deviceId === id), `device ${id} not in list (${list.length} devices)`);
    ok('list');

    begin('delete');
    await registry.delete(id);
    deleted = true;
    ok('delete');

    begin('get_deleted_404');
    const gone = await expectStatus(404, registry.get(id));
    // DeviceNotFoundError only when the body is {"Message":"ErrorCode:DeviceNotFound;..."}.
    eq(gone.name, 'DeviceNotFoundError', 'error class for 404');
    ok('get_deleted_404');
  } finally {
    if (!deleted) {
      try {
        await registry.delete(id);
      } catch (_) {
        // best-effort cleanup
      }
    }
  }
  return 0;
}

main().then(
  (rc) => {
    if (rc === 0) console.log('PASS service_registry.js');
    process.exit(rc);
  },
  (err) => {
    console.error(`FAIL service_registry.js in step '${currentStep}'`);
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  },
);
