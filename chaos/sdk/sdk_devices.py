"""Official azure-iot-device 2.14 devices for the chaos workload.

Each device sends numbered telemetry (message_id "{device}-{seq}", custom property "seq") with
send_message, which returns only after the PUBACK; one message in flight per device. The SDK's own
retry handles broken connections. Its MQTT port is fixed (8883), so it connects through a SOCKS5
relay that stands in for DNS/a load balancer: each new connection goes to the next node that
accepts (CHAOS_NODES), so a device whose node dies reconnects to another one.

Env: MERIDIAN_CA_CERT, CHAOS_NODES ("host:port,..." MQTT/TLS endpoints), CHAOS_DEVICES (JSON
[[id, key], ...]), CHAOS_STOP_FILE (stop once it exists).
Prints "ready" once every device is connected, and at the end one line:
ACKED {"device": [seq, ...], ...}
"""
import json
import os
import socket
import struct
import sys
import threading
import time

from azure.iot.device import IoTHubDeviceClient, Message, ProxyOptions

ca = open(os.environ["MERIDIAN_CA_CERT"]).read()
nodes = [(h, int(p)) for h, p in (n.rsplit(":", 1) for n in os.environ["CHAOS_NODES"].split(","))]
devices = json.loads(os.environ["CHAOS_DEVICES"])
stop_file = os.environ["CHAOS_STOP_FILE"]


class RotatingSocks5:
    """SOCKS5 (no auth, CONNECT): every new connection goes to the next node that accepts."""

    def __init__(self, upstreams):
        self.upstreams = upstreams
        self.next = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.sock.accept()
            threading.Thread(target=self.handle, args=(client,), daemon=True).start()

    @staticmethod
    def exact(sock, n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def upstream(self):
        with self.lock:
            start = self.next
            self.next = (self.next + 1) % len(self.upstreams)
        for i in range(len(self.upstreams)):
            host, port = self.upstreams[(start + i) % len(self.upstreams)]
            try:
                return socket.create_connection((host, port), timeout=1)
            except OSError:
                continue
        return None

    def handle(self, client):
        try:
            client.settimeout(10)
            _ver, n = self.exact(client, 2)
            self.exact(client, n)
            client.sendall(b"\x05\x00")
            _ver, _cmd, _rsv, atyp = self.exact(client, 4)
            if atyp == 1:
                self.exact(client, 4)
            elif atyp == 3:
                self.exact(client, self.exact(client, 1)[0])
            else:
                self.exact(client, 16)
            self.exact(client, 2)
            up = self.upstream()
            if up is None:
                client.sendall(struct.pack("!BBBB4sH", 5, 5, 0, 1, b"\0\0\0\0", 0))
                client.close()
                return
            client.sendall(struct.pack("!BBBB4sH", 5, 0, 0, 1, b"\0\0\0\0", 0))
            client.settimeout(None)
            up.settimeout(None)
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()
        except Exception:
            client.close()

    @staticmethod
    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


relay = RotatingSocks5(nodes)
proxy = ProxyOptions(proxy_type="SOCKS5", proxy_addr="127.0.0.1", proxy_port=relay.port)
acked = {}
lock = threading.Lock()
connected = threading.Barrier(len(devices) + 1)


def run(device_id, key):
    client = IoTHubDeviceClient.create_from_connection_string(
        "HostName=localhost;DeviceId=%s;SharedAccessKey=%s" % (device_id, key),
        server_verification_cert=ca,
        proxy_options=proxy,
        connection_retry=True,
        connection_retry_interval=1,
    )
    # The first connect is the application's to retry (the SDK retries only once connected): a
    # node of a secondary region refuses it (CONNACK 3) and the relay moves on to the next node.
    while True:
        try:
            client.connect()
            break
        except Exception:
            time.sleep(0.5)
    connected.wait()
    seq = 1
    while not os.path.exists(stop_file):
        m = Message(str(seq))
        m.message_id = "%s-%d" % (device_id, seq)
        m.custom_properties["seq"] = str(seq)
        try:
            client.send_message(m)
        except Exception:
            time.sleep(0.5)
            continue  # resend the same seq (same message id)
        with lock:
            acked.setdefault(device_id, []).append(seq)
        seq += 1


threads = [threading.Thread(target=run, args=(d, k), name=d, daemon=True) for d, k in devices]
for t in threads:
    t.start()
connected.wait()
print("ready", flush=True)
while not os.path.exists(stop_file):
    time.sleep(0.2)
# Give the devices a moment to finish the message in flight; one still waiting for its PUBACK
# (the SDK retrying through a slow reconnect) just does not count as acknowledged.
deadline = time.time() + 20
for t in threads:
    t.join(timeout=max(0.0, deadline - time.time()))
with lock:
    print("ACKED " + json.dumps(acked), flush=True)
stuck = [t.name for t in threads if t.is_alive()]
if stuck:
    print("still sending at stop: %d devices" % len(stuck), file=sys.stderr, flush=True)
# The SDK's shutdown can block on a half-open connection; the process exit closes everything.
os._exit(0)
