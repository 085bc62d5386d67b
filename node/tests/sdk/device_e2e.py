#!/usr/bin/env python3
"""Black-box test: the official Python device SDK (azure-iot-device 2.14.0), unmodified, against
Meridian's MQTT device endpoint, with the official service SDK (azure-iot-hub 2.7.0) as the
other side.

Steps (each prints "ok <step>"): create_device, connect, telemetry, get_twin, reported_patch,
desired_patch, direct_method, c2d, reconnect, shutdown, and x509 when a client cert is given.

Environment:
  MERIDIAN_CONNECTION_STRING  required, service "HostName=localhost:PORT;SharedAccessKeyName=iothubowner;SharedAccessKey=..."
  MERIDIAN_CA_CERT            required, PEM file with the test CA (device TLS trust, and
                              REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE for the service SDK and the C2D POST)
  MERIDIAN_MQTT_PORT          required, the server's MQTT/TLS port (the device SDK dials 8883)
  MERIDIAN_HTTPS_PORT         the server's HTTPS port, also MQTT-over-WebSockets at /$iothub/websocket
                              (the device SDK dials 443 for websockets); default: the port in HostName
  MERIDIAN_TRANSPORT          "mqtt" (default) or "ws"
  MERIDIAN_TEST_PREFIX        id prefix (default "pydev-<random>-")
  MERIDIAN_DEVICE_HOSTNAME    HostName used in the device connection string (default: the service
                              HostName without its port, i.e. "localhost")
  MERIDIAN_X509_CERT, MERIDIAN_X509_KEY
                              optional PEM paths; when both are set, an extra x509 step registers a
                              selfSigned device with the cert's SHA-256 thumbprint and sends one message
  MERIDIAN_TEST_TIMEOUT       watchdog seconds for the whole run (default 150)
  MERIDIAN_HTTP_TIMEOUT       per-request socket timeout of the service SDK (default 20)

Port redirect: the Python device SDK hard-codes port 8883 (443 for websockets). The script starts a
SOCKS5 server on 127.0.0.1:<ephemeral> (no auth, CONNECT only, IPv4/domain/IPv6 addresses) that
relays requested port 8883 to 127.0.0.1:MERIDIAN_MQTT_PORT and 443 to 127.0.0.1:MERIDIAN_HTTPS_PORT,
and hands it to the SDK via its public proxy_options (ProxyOptions("SOCKS5", "127.0.0.1", port));
paho dials through PySocks. TLS is end to end (SNI / hostname check: "localhost").

Run with the venv made by node/tests/sdk/setup.sh (or any python3: it re-execs itself into that venv):
  MERIDIAN_CONNECTION_STRING=... MERIDIAN_CA_CERT=ca.pem MERIDIAN_MQTT_PORT=18883 MERIDIAN_HTTPS_PORT=18443 \
    ~/.cache/meridian-sdk/venv/bin/python node/tests/sdk/device_e2e.py

Output: "ok <step>" lines, one "SENT {json}" line per telemetry message (message_id, seq,
device_id), then "PASS device_e2e.py".
Exit codes: 0 all passed, 1 a step failed (traceback printed), 2 watchdog timeout.
"""

import base64
import hashlib
import hmac
import json
import os
import queue
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import uuid

CURRENT_STEP = "startup"


def _watchdog(signum, frame):
    sys.stdout.flush()
    sys.stderr.write("TIMEOUT: watchdog fired during step '%s'; stack:\n" % CURRENT_STEP)
    traceback.print_stack(frame, file=sys.stderr)
    sys.stderr.flush()
    os._exit(2)


signal.signal(signal.SIGALRM, _watchdog)
signal.alarm(int(os.environ.get("MERIDIAN_TEST_TIMEOUT", "150")))

CONN = os.environ.get("MERIDIAN_CONNECTION_STRING")
CA = os.environ.get("MERIDIAN_CA_CERT")
PREFIX = os.environ.get("MERIDIAN_TEST_PREFIX") or ("pydev-" + uuid.uuid4().hex[:8] + "-")
TRANSPORT = (os.environ.get("MERIDIAN_TRANSPORT") or "mqtt").strip().lower()
HTTP_TIMEOUT = int(os.environ.get("MERIDIAN_HTTP_TIMEOUT", "20"))
X509_CERT = os.environ.get("MERIDIAN_X509_CERT")
X509_KEY = os.environ.get("MERIDIAN_X509_KEY")

if CA:
    # requests (under msrest, and our own C2D POST) reads REQUESTS_CA_BUNDLE, then CURL_CA_BUNDLE;
    # the build image presets both to the system bundle, so override both.
    os.environ["REQUESTS_CA_BUNDLE"] = CA
    os.environ["CURL_CA_BUNDLE"] = CA

try:
    import requests
    from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse, ProxyOptions, X509
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
except ImportError:
    # Not running inside the SDK venv: re-exec with the venv python made by setup.sh, if present.
    _cache = os.environ.get("MERIDIAN_SDK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meridian-sdk")
    _venv_py = os.path.join(_cache, "venv", "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(_cache, "venv")):
        sys.stdout.flush()
        os.execv(_venv_py, [_venv_py, os.path.abspath(__file__)] + sys.argv[1:])
    sys.stderr.write("azure-iot-device / azure-iot-hub not importable; run node/tests/sdk/setup.sh first\n")
    raise


class StepFailure(AssertionError):
    pass


def ok(step):
    print("ok %s" % step, flush=True)


def note(msg, *args):
    print("note: " + (msg % args if args else msg), flush=True)


def begin(step):
    global CURRENT_STEP
    CURRENT_STEP = step


def check(cond, msg, *args):
    if not cond:
        raise StepFailure("[%s] %s" % (CURRENT_STEP, msg % args if args else msg))


def eq(got, want, what):
    check(got == want, "%s: got %r, want %r", what, got, want)


def bounded(timeout, what, fn, *args, **kwargs):
    """Run a blocking SDK call in a daemon thread; fail the step if it does not finish in time.

    The device SDK has no timeouts of its own (publish / twin / handler-setter SUBSCRIBE wait
    forever), so every blocking call goes through here. A call that times out keeps running in
    its daemon thread; the process ends with os._exit anyway.
    """
    box = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=run, name="bounded:" + what, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise StepFailure("[%s] %s did not complete within %.0f s" % (CURRENT_STEP, what, timeout))
    if "error" in box:
        raise box["error"]
    return box.get("value")


def wait_for(q, timeout, what, pred=lambda item: True):
    """Take items from queue q until one satisfies pred; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepFailure("[%s] %s not received within %.0f s (got instead: %r)" % (CURRENT_STEP, what, timeout, seen))
        try:
            item = q.get(timeout=left)
        except queue.Empty:
            continue
        if pred(item):
            return item
        seen.append(item)


def parse_cs(cs):
    out = {}
    for part in cs.split(";"):
        if part:
            k, _, v = part.partition("=")
            out[k] = v
    return out


def split_host_port(host):
    m = re.match(r"^(.*):(\d+)$", host)
    if m and not host.endswith("]"):
        return m.group(1), int(m.group(2))
    return host, None


# --------------------------------------------------------------------------- SOCKS5 redirector


class Socks5Redirector:
    """Minimal SOCKS5 server (RFC 1928): no auth, CONNECT only, ATYP IPv4 / domain / IPv6.

    The requested host is ignored (logged); the requested port picks the upstream:
    port_map = {8883: mqtt_port, 443: https_port}. Other ports are refused (REP 0x02).
    Upstream connect failure -> REP 0x05 (connection refused), so the SDK's connect() fails fast.
    """

    def __init__(self, port_map, upstream_host="127.0.0.1"):
        self.port_map = port_map
        self.upstream_host = upstream_host
        self.requests = []  # (requested host, requested port, upstream port or None, result)
        self._lock = threading.Lock()
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self.port = self._lsock.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="socks5-accept", daemon=True).start()

    def _log(self, entry):
        with self._lock:
            self.requests.append(entry)

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="socks5-conn", daemon=True).start()

    @staticmethod
    def _recv_exact(sock, n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("socks client closed during handshake")
            buf += chunk
        return buf

    @staticmethod
    def _reply(sock, rep):
        # VER REP RSV ATYP=IPv4 BND.ADDR=0.0.0.0 BND.PORT=0
        sock.sendall(struct.pack("!BBBB4sH", 5, rep, 0, 1, b"\0\0\0\0", 0))

    def _handle(self, client):
        upstream = None
        try:
            client.settimeout(10)
            ver, nmethods = self._recv_exact(client, 2)
            if ver != 5:
                return
            methods = self._recv_exact(client, nmethods)
            if 0 not in methods:
                client.sendall(b"\x05\xff")
                return
            client.sendall(b"\x05\x00")
            ver, cmd, _rsv, atyp = self._recv_exact(client, 4)
            if atyp == 1:
                host = socket.inet_ntop(socket.AF_INET, self._recv_exact(client, 4))
            elif atyp == 3:
                (ln,) = self._recv_exact(client, 1)
                host = self._recv_exact(client, ln).decode("idna")
            elif atyp == 4:
                host = socket.inet_ntop(socket.AF_INET6, self._recv_exact(client, 16))
            else:
                self._reply(client, 8)  # address type not supported
                return
            (port,) = struct.unpack("!H", self._recv_exact(client, 2))
            if cmd != 1:
                self._reply(client, 7)  # command not supported
                self._log((host, port, None, "bad command %d" % cmd))
                return
            target = self.port_map.get(port)
            if target is None:
                self._reply(client, 2)  # not allowed by ruleset
                self._log((host, port, None, "port not mapped"))
                return
            try:
                upstream = socket.create_connection((self.upstream_host, target), timeout=5)
            except OSError as exc:
                self._reply(client, 5)  # connection refused
                self._log((host, port, target, "upstream connect failed: %s" % exc))
                return
            self._log((host, port, target, "relayed"))
            self._reply(client, 0)
            client.settimeout(None)
            upstream.settimeout(None)
            self._relay(client, upstream)
        except Exception:  # noqa: BLE001 - one broken proxy connection must not kill the test
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    @staticmethod
    def _relay(a, b):
        socks = [a, b]
        peer = {a: b, b: a}
        open_dirs = {a: True, b: True}  # source still readable
        while any(open_dirs.values()):
            readable = [s for s in socks if open_dirs[s]]
            r, _, _ = select.select(readable, [], [], 60)
            for s in r:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data:
                    try:
                        peer[s].sendall(data)
                    except OSError:
                        return
                else:
                    open_dirs[s] = False
                    try:
                        peer[s].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass

    def summary(self):
        with self._lock:
            return list(self.requests)


# --------------------------------------------------------------------------- service-side helpers


def service_sas(host_with_port, key_name, key_b64, ttl=3600):
    """Service SAS token, built exactly like azure-iot-hub's SasToken (sastoken.py)."""
    sr = urllib.parse.quote_plus(host_with_port)
    se = str(int(time.time() + ttl))
    sig = hmac.HMAC(base64.b64decode(key_b64), (sr + "\n" + se).encode("utf-8"), hashlib.sha256)
    sig = urllib.parse.quote(base64.b64encode(sig.digest()))
    return "SharedAccessSignature sr={}&sig={}&se={}&skn={}".format(sr, sig, se, key_name)


def cert_sha256_thumbprint(pem_path):
    with open(pem_path) as f:
        pem = f.read()
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", pem, re.S)
    if not m:
        raise StepFailure("[%s] no certificate in %s" % (CURRENT_STEP, pem_path))
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0))).hexdigest().upper()


def make_device_client(device_cs, ca_pem, proxy, websockets):
    return IoTHubDeviceClient.create_from_connection_string(
        device_cs,
        server_verification_cert=ca_pem,
        proxy_options=proxy,
        websockets=websockets,
        # Fail fast on a dropped connection instead of silently retrying every 10 s.
        connection_retry=False,
    )


def invoke_echo(rm, device_id, payload):
    req = CloudToDeviceMethod(method_name="echo", payload=payload, response_timeout_in_seconds=15)
    return bounded(30, "invoke_device_method", rm.invoke_device_method, device_id, req)


# --------------------------------------------------------------------------- main


def main():
    if not CONN:
        print("MERIDIAN_CONNECTION_STRING is not set", file=sys.stderr)
        return 1
    if not CA:
        print("MERIDIAN_CA_CERT is not set", file=sys.stderr)
        return 1
    if TRANSPORT not in ("mqtt", "ws"):
        print("MERIDIAN_TRANSPORT must be mqtt or ws, got %r" % TRANSPORT, file=sys.stderr)
        return 1
    svc = parse_cs(CONN)
    svc_host = svc["HostName"]
    host_only, svc_port = split_host_port(svc_host)
    mqtt_port = os.environ.get("MERIDIAN_MQTT_PORT")
    https_port = os.environ.get("MERIDIAN_HTTPS_PORT") or (str(svc_port) if svc_port else None)
    if not mqtt_port:
        print("MERIDIAN_MQTT_PORT is not set", file=sys.stderr)
        return 1
    if not https_port:
        print("MERIDIAN_HTTPS_PORT is not set and HostName has no port", file=sys.stderr)
        return 1
    device_host = os.environ.get("MERIDIAN_DEVICE_HOSTNAME") or host_only
    with open(CA) as f:
        ca_pem = f.read()

    redirector = Socks5Redirector({8883: int(mqtt_port), 443: int(https_port)})
    proxy = ProxyOptions(proxy_type="SOCKS5", proxy_addr="127.0.0.1", proxy_port=redirector.port)
    websockets = TRANSPORT == "ws"
    note(
        "transport=%s device HostName=%s socks5=127.0.0.1:%d (8883->%s, 443->%s)",
        TRANSPORT, device_host, redirector.port, mqtt_port, https_port,
    )

    rm = IoTHubRegistryManager.from_connection_string(CONN)
    rm.protocol.config.connection.timeout = HTTP_TIMEOUT

    dev = PREFIX + "dev"
    created = []
    client = None
    try:
        # ------------------------------------------------------------ a. device + connect
        begin("create_device")
        d = bounded(60, "create_device_with_sas", rm.create_device_with_sas, dev, "", "", "enabled")
        created.append(dev)
        eq(d.device_id, dev, "deviceId")
        pk = d.authentication.symmetric_key.primary_key
        check(bool(pk), "server did not generate a primary key")
        ok("create_device")

        begin("connect")
        device_cs = "HostName={};DeviceId={};SharedAccessKey={}".format(device_host, dev, pk)
        client = make_device_client(device_cs, ca_pem, proxy, websockets)
        background = []

        def on_background_exception(exc):
            background.append(exc)
            sys.stderr.write("device SDK background exception: %r\n" % (exc,))

        client.on_background_exception = on_background_exception
        bounded(20, "connect()", client.connect)
        check(client.connected, "client.connected is False after connect()")
        ok("connect")

        # ------------------------------------------------------------ b. telemetry
        begin("telemetry")
        sent = []
        for i in range(5):
            msg = Message(
                json.dumps({"seq": i}),
                message_id="%sm%d" % (PREFIX, i),
                content_encoding="utf-8",
                content_type="application/json",
            )
            msg.correlation_id = "%scorr" % PREFIX
            msg.custom_properties = {"seq": str(i), "needs encoding": "a/b&c=d ü"}
            bounded(15, "send_message #%d" % i, client.send_message, msg)
            sent.append({"message_id": msg.message_id, "seq": i, "device_id": dev})
        for s in sent:
            print("SENT " + json.dumps(s), flush=True)
        ok("telemetry")

        # ------------------------------------------------------------ c. twin GET
        begin("get_twin")
        twin = bounded(15, "get_twin()", client.get_twin)
        check(isinstance(twin, dict), "get_twin returned %r", type(twin))
        for part in ("desired", "reported"):
            check(isinstance(twin.get(part), dict), "twin has no %r dict: %r", part, twin)
            check(isinstance(twin[part].get("$version"), int), "twin.%s has no int $version: %r", part, twin[part])
        reported_v0 = twin["reported"]["$version"]
        ok("get_twin")

        # ------------------------------------------------------------ d. reported patch
        begin("reported_patch")
        key = re.sub(r"[^A-Za-z0-9_-]", "_", PREFIX) or "e2e"
        bounded(
            15, "patch_twin_reported_properties()",
            client.patch_twin_reported_properties, {"fw": "1.2.3", key: {"ok": True}},
        )
        st = bounded(30, "service get_twin", rm.get_twin, dev)
        rep = st.properties.reported or {}
        eq(rep.get("fw"), "1.2.3", "service twin properties.reported.fw")
        eq(rep.get(key), {"ok": True}, "service twin properties.reported[%r]" % key)
        rv = rep.get("$version")
        check(isinstance(rv, int) and rv > reported_v0, "reported $version must grow past %r, got %r", reported_v0, rv)
        ok("reported_patch")

        # ------------------------------------------------------------ e. desired patch
        begin("desired_patch")
        patches = queue.Queue()
        bounded(
            20, "set on_twin_desired_properties_patch_received (SUBSCRIBE)",
            setattr, client, "on_twin_desired_properties_patch_received", patches.put,
        )
        t = bounded(
            30, "service update_twin", rm.update_twin,
            dev, Twin(properties=TwinProperties(desired={"target": 22})), "*",
        )
        dv = t.properties.desired.get("$version")
        patch = wait_for(patches, 10, "desired patch with target=22",
                         lambda p: isinstance(p, dict) and p.get("target") == 22)
        check(isinstance(patch.get("$version"), int), "desired patch has no int $version: %r", patch)
        if dv is not None:
            eq(patch["$version"], dv, "desired patch $version vs service twin desired $version")
        ok("desired_patch")

        # ------------------------------------------------------------ f. direct method
        begin("direct_method")
        method_calls = queue.Queue()

        def on_method(req):
            method_calls.put((req.name, req.payload))
            client.send_method_response(MethodResponse.create_from_method_request(req, 200, {"echo": req.payload}))

        bounded(20, "set on_method_request_received (SUBSCRIBE)", setattr, client, "on_method_request_received", on_method)
        res = invoke_echo(rm, dev, {"x": 1})
        eq(res.status, 200, "method result status")
        eq(res.payload, {"echo": {"x": 1}}, "method result payload")
        eq(wait_for(method_calls, 1, "method request record"), ("echo", {"x": 1}), "method request seen by device")
        ok("direct_method")

        # ------------------------------------------------------------ g. C2D (REST send)
        begin("c2d")
        c2d = queue.Queue()
        bounded(20, "set on_message_received (SUBSCRIBE)", setattr, client, "on_message_received", c2d.put)
        url = "https://{}/devices/{}/messages/devicebound?api-version=2021-04-12".format(
            svc_host, urllib.parse.quote(dev, safe="")
        )
        headers = {
            "Authorization": service_sas(svc_host, svc["SharedAccessKeyName"], svc["SharedAccessKey"]),
            "iothub-messageid": PREFIX + "c2d1",
            "iothub-correlationid": "corr1",
            "iothub-ack": "full",
            "iothub-app-color": "blue",
            "Content-Type": "application/json",
        }
        r = bounded(30, "C2D POST", lambda: requests.post(url, data=b'{"cmd":"on"}', headers=headers,
                                                       verify=CA, timeout=HTTP_TIMEOUT))
        check(r.status_code == 204, "C2D POST: got HTTP %d (body %r), want 204", r.status_code, r.text[:300])
        m = wait_for(c2d, 10, "C2D message %s" % (PREFIX + "c2d1"))
        eq(m.data, b'{"cmd":"on"}', "C2D data")
        eq(m.message_id, PREFIX + "c2d1", "C2D message_id")
        eq((m.custom_properties or {}).get("color"), "blue", "C2D custom_properties['color']")
        if m.correlation_id != "corr1":
            note("C2D correlation_id is %r (sent iothub-correlationid: corr1)", m.correlation_id)
        if m.ack != "full":
            note("C2D ack is %r (sent iothub-ack: full)", m.ack)
        ok("c2d")

        # ------------------------------------------------------------ h. reconnect, no re-SUBSCRIBE
        begin("reconnect")
        bounded(20, "disconnect()", client.disconnect)
        check(not client.connected, "client.connected is True after disconnect()")
        bounded(20, "connect() again", client.connect)
        check(client.connected, "client.connected is False after reconnect")
        twin2 = bounded(15, "get_twin() after reconnect", client.get_twin)
        check(isinstance(twin2, dict) and "desired" in twin2 and "reported" in twin2, "bad twin after reconnect: %r", twin2)
        eq(twin2["reported"].get("fw"), "1.2.3", "reported.fw after reconnect")
        eq(twin2["desired"].get("target"), 22, "desired.target after reconnect")
        res = invoke_echo(rm, dev, {"x": 2})
        eq(res.status, 200, "method result status after reconnect (server must keep the session's subscriptions)")
        eq(res.payload, {"echo": {"x": 2}}, "method result payload after reconnect")
        ok("reconnect")

        # ------------------------------------------------------------ i. shutdown
        begin("shutdown")
        bounded(20, "shutdown()", client.shutdown)
        client = None
        if background:
            note("device SDK reported %d background exception(s): %r", len(background), background)
        ok("shutdown")

        # ------------------------------------------------------------ x509 (optional)
        if X509_CERT and X509_KEY:
            begin("x509")
            dev2 = PREFIX + "x509"
            thumb = cert_sha256_thumbprint(X509_CERT)
            d2 = bounded(60, "create_device_with_x509", rm.create_device_with_x509, dev2, thumb, thumb, "enabled")
            created.append(dev2)
            eq(d2.device_id, dev2, "x509 deviceId")
            xc = IoTHubDeviceClient.create_from_x509_certificate(
                X509(X509_CERT, X509_KEY),
                hostname=device_host,
                device_id=dev2,
                server_verification_cert=ca_pem,
                proxy_options=proxy,
                websockets=websockets,
                connection_retry=False,
            )
            try:
                bounded(20, "x509 connect()", xc.connect)
                msg = Message(json.dumps({"seq": 0}), message_id=PREFIX + "x0",
                              content_encoding="utf-8", content_type="application/json")
                msg.custom_properties = {"seq": "0", "auth": "x509"}
                bounded(15, "x509 send_message", xc.send_message, msg)
                print("SENT " + json.dumps({"message_id": msg.message_id, "seq": 0, "device_id": dev2}), flush=True)
                bounded(20, "x509 disconnect()", xc.disconnect)
            finally:
                try:
                    bounded(10, "x509 shutdown()", xc.shutdown)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            ok("x509")
    except BaseException:
        sys.stderr.write("socks5 requests: %r\n" % (redirector.summary(),))
        raise
    finally:
        if client is not None:
            try:
                bounded(10, "cleanup shutdown()", client.shutdown)
            except BaseException:  # noqa: BLE001 - best effort
                pass
        for dev_id in created:
            try:
                bounded(15, "cleanup delete_device", rm.delete_device, dev_id)
            except BaseException:  # noqa: BLE001 - best effort
                pass
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    except BaseException:  # noqa: BLE001
        sys.stdout.flush()
        print("FAIL device_e2e.py in step '%s'" % CURRENT_STEP, file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if rc == 0:
        print("PASS device_e2e.py", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit skips SDK teardown (__del__ of the AMQP client, paho threads) at interpreter shutdown.
    os._exit(rc)
