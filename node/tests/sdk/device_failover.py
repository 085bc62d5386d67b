"""The official azure-iot-device SDK survives the loss of the node holding its connection.

The device connects to node A (through the SOCKS relay that stands in for DNS/load balancing),
subscribes to C2D and direct methods, then node A is killed (SIGKILL, pid from the test). The relay
now points at node B; the SDK's own retry reconnects with clean_session=0 and never re-subscribes.
A C2D message sent while it was away arrives, and a direct method invoked through the service
(on node S) reaches it on node B.

Env: MERIDIAN_CONNECTION_STRING (service, points at node S), MERIDIAN_CA_CERT, MERIDIAN_MQTT_A,
MERIDIAN_MQTT_B, MERIDIAN_HTTPS_PORT (node S), MERIDIAN_KILL_PID (node A).
"""
import json
import os
import queue
import signal
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import device_e2e as e2e  # noqa: E402
import requests  # noqa: E402
from azure.iot.device import IoTHubDeviceClient, MethodResponse, ProxyOptions  # noqa: E402
from azure.iot.hub import IoTHubRegistryManager  # noqa: E402
from azure.iot.hub.models import CloudToDeviceMethod  # noqa: E402

conn = os.environ["MERIDIAN_CONNECTION_STRING"]
ca = os.environ["MERIDIAN_CA_CERT"]
svc = e2e.parse_cs(conn)
https_port = int(os.environ["MERIDIAN_HTTPS_PORT"])
relay = e2e.Socks5Redirector({8883: int(os.environ["MERIDIAN_MQTT_A"]), 443: https_port})
proxy = ProxyOptions(proxy_type="SOCKS5", proxy_addr="127.0.0.1", proxy_port=relay.port)

rm = IoTHubRegistryManager.from_connection_string(conn)
device_id = "failover-dev"
dev = rm.create_device_with_sas(device_id, "", "", "enabled")
key = dev.authentication.symmetric_key.primary_key
client = IoTHubDeviceClient.create_from_connection_string(
    "HostName=localhost;DeviceId=%s;SharedAccessKey=%s" % (device_id, key),
    server_verification_cert=open(ca).read(),
    proxy_options=proxy,
    connection_retry=True,
    connection_retry_interval=1,
)
messages = queue.Queue()
client.on_message_received = lambda m: messages.put(m)


def answer(request):
    client.send_method_response(MethodResponse.create_from_method_request(request, 200, {"echo": request.payload}))


client.on_method_request_received = answer
e2e.bounded(30, "connect", client.connect)
print("ok connected to node A", flush=True)

# Node A dies; "DNS" now points at node B.
os.kill(int(os.environ["MERIDIAN_KILL_PID"]), signal.SIGKILL)
relay.port_map[8883] = int(os.environ["MERIDIAN_MQTT_B"])
print("ok node A killed", flush=True)

# A C2D message sent while the device is away.
url = "https://localhost:%d/devices/%s/messages/devicebound?api-version=2021-04-12" % (https_port, urllib.parse.quote(device_id))
headers = {
    "Authorization": e2e.service_sas(svc["HostName"], svc["SharedAccessKeyName"], svc["SharedAccessKey"]),
    "iothub-messageid": "while-away",
}
r = requests.post(url, data=b"queued", headers=headers, verify=ca, timeout=20)
assert r.status_code == 204, r.status_code
message = messages.get(timeout=60)
assert message.message_id == "while-away", message.message_id
assert message.data == b"queued", message.data
print("ok queued C2D delivered after reconnecting to node B", flush=True)

# A direct method through node S reaches the device on node B (no re-subscribe by the SDK).
deadline = time.time() + 30
while True:
    try:
        result = rm.invoke_device_method(device_id, CloudToDeviceMethod(method_name="ping", payload={"n": 7}, response_timeout_in_seconds=10))
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(0.5)
assert result.status == 200 and result.payload == {"echo": {"n": 7}}, (result.status, result.payload)
print("ok method answered on node B", flush=True)
e2e.bounded(30, "shutdown", client.shutdown)
print("PASS device_failover.py", flush=True)
