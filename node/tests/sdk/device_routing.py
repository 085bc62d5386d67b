"""Sends telemetry with the official azure-iot-device SDK for the routing test: one message per
routing case, printing `SENT <message id>` after each PUBACK.

Env: MERIDIAN_CA_CERT, MERIDIAN_MQTT_PORT, MERIDIAN_HTTPS_PORT, MERIDIAN_DEVICES
("id:key,id:key"; the first device is untagged, the second has tags.site = 'a').
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import device_e2e as e2e  # noqa: E402  (SOCKS relay to the SDK's fixed port 8883, helpers)
from azure.iot.device import Message, ProxyOptions  # noqa: E402

ca_pem = open(os.environ["MERIDIAN_CA_CERT"]).read()
relay = e2e.Socks5Redirector({8883: int(os.environ["MERIDIAN_MQTT_PORT"]), 443: int(os.environ["MERIDIAN_HTTPS_PORT"])})
proxy = ProxyOptions(proxy_type="SOCKS5", proxy_addr="127.0.0.1", proxy_port=relay.port)
devices = [pair.split(":", 1) for pair in os.environ["MERIDIAN_DEVICES"].split(",")]

PLAN = {
    0: [
        ("rt-crit", '{"temp": 1}', None, None, {"level": "critical"}),
        ("rt-json-hot", '{"temp": 40}', "application/json", "utf-8", {}),
        ("rt-text-hot", '{"temp": 40}', "text/plain", "utf-8", {}),
        ("rt-cold", '{"temp": 10}', "application/json", "utf-8", {}),
    ],
    1: [("rt-site", "hello", None, None, {})],
}

for index, (device_id, key) in enumerate(devices):
    cs = "HostName=localhost;DeviceId=%s;SharedAccessKey=%s" % (device_id, key)
    client = e2e.make_device_client(cs, ca_pem, proxy, False)
    e2e.bounded(30, "connect", client.connect)
    for mid, body, content_type, encoding, props in PLAN[index]:
        msg = Message(body, message_id=mid, content_type=content_type, content_encoding=encoding)
        msg.custom_properties.update(props)
        e2e.bounded(30, "send " + mid, client.send_message, msg)
        print("SENT " + mid, flush=True)
    e2e.bounded(30, "shutdown", client.shutdown)
print("PASS device_routing.py", flush=True)
