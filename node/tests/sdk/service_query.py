"""The official azure-iot-hub SDK's query_iot_hub against Meridian, paging through every result.

Env: MERIDIAN_CONNECTION_STRING, MERIDIAN_CA_CERT, MERIDIAN_QUERY_PREFIX (device id prefix the
caller created), MERIDIAN_QUERY_TOTAL (devices created), MERIDIAN_QUERY_TAGGED (how many of them
have tags.fleet = 'blue'). Prints PASS service_query.py on success.
"""
import os
import signal
import sys

signal.signal(signal.SIGALRM, lambda *_: (print("TIMEOUT service_query.py", flush=True), os._exit(2)))
signal.alarm(120)

os.environ["REQUESTS_CA_BUNDLE"] = os.environ["MERIDIAN_CA_CERT"]
os.environ["CURL_CA_BUNDLE"] = os.environ["MERIDIAN_CA_CERT"]

from azure.iot.hub import IoTHubRegistryManager  # noqa: E402
from azure.iot.hub.models import QuerySpecification  # noqa: E402

prefix = os.environ["MERIDIAN_QUERY_PREFIX"]
total = int(os.environ["MERIDIAN_QUERY_TOTAL"])
tagged = int(os.environ["MERIDIAN_QUERY_TAGGED"])
rm = IoTHubRegistryManager.from_connection_string(os.environ["MERIDIAN_CONNECTION_STRING"])


def query_all(text, page):
    seen, token, pages = [], None, 0
    while True:
        result = rm.query_iot_hub(QuerySpecification(query=text), token, page)
        pages += 1
        seen.extend(result.items)
        token = result.continuation_token
        if not token:
            return seen, pages


twins, pages = query_all("SELECT * FROM devices WHERE STARTSWITH(deviceId, '%s')" % prefix, 100)
ids = [t.device_id for t in twins]
assert len(ids) == total, (len(ids), total)
assert len(set(ids)) == total, "a device came back twice"
assert pages == (total + 99) // 100, pages
print("ok paged %d twins in %d pages" % (len(ids), pages), flush=True)

blue, _ = query_all("SELECT * FROM devices WHERE tags.fleet = 'blue' AND STARTSWITH(deviceId, '%s')" % prefix, 250)
assert len(blue) == tagged, (len(blue), tagged)
assert all(t.tags.get("fleet") == "blue" for t in blue)
print("ok filtered %d tagged twins" % len(blue), flush=True)

try:
    rm.query_iot_hub(QuerySpecification(query="SELECT * FROM nowhere"))
    raise AssertionError("a bad query must fail")
except Exception as e:  # msrest HttpOperationError
    assert getattr(getattr(e, "response", None), "status_code", None) == 400, e
print("ok bad query 400", flush=True)
print("PASS service_query.py", flush=True)
