#!/usr/bin/env python3
"""Benchmark half of `amqp-bench` (chaos/src/bin/amqp_bench.rs): the official Python clients against
a loaded `meridian dev` node.

1. Event Hub-compatible read throughput with azure-eventhub 5.15.1 (EventHubConsumerClient
   .receive_batch, prefetch 300, max batch 300): partition 0 alone, then every partition, from the
   start until the expected number of events arrived.
2. C2D sends/s with azure-iot-hub 2.7.0 (uamqp): sequential send_c2d_message calls, each
   acknowledged (disposition accepted) only after the hub committed the message.

Environment: MERIDIAN_CREDENTIALS (dev-credentials.json), MERIDIAN_HTTPS_PORT, MERIDIAN_EVENT_HUB,
MERIDIAN_EXPECTED (JSON list: events per partition), MERIDIAN_C2D_DEVICES (JSON list of device ids),
MERIDIAN_C2D_MESSAGES (total sends). Prints one line "RESULT {json}".
"""

import json
import os
import sys
import threading
import time

CREDS = json.load(open(os.environ["MERIDIAN_CREDENTIALS"]))
CA = CREDS["ca_cert"]
import certifi  # noqa: E402

certifi.where = lambda: CA  # uamqp's trust store: the test CA

from azure.eventhub import EventHubConsumerClient  # noqa: E402
from azure.iot.hub import IoTHubRegistryManager  # noqa: E402

HTTPS_PORT = int(os.environ["MERIDIAN_HTTPS_PORT"])
EVENT_HUB = os.environ["MERIDIAN_EVENT_HUB"]
EXPECTED = json.loads(os.environ["MERIDIAN_EXPECTED"])
KEY = next(p["primaryKey"] for p in CREDS["shared_access_policies"] if p["keyName"] == "service")


def read(partition_id, want, timeout=300):
    client = EventHubConsumerClient.from_connection_string(
        "Endpoint=sb://localhost/;SharedAccessKeyName=service;SharedAccessKey=%s;EntityPath=%s"
        % (KEY, EVENT_HUB),
        consumer_group="$Default",
        connection_verify=CA,
        custom_endpoint_address="sb://localhost:%d" % HTTPS_PORT,
    )
    got = [0]
    first = [None]
    done = threading.Event()
    lock = threading.Lock()

    def on_batch(ctx, events):
        with lock:
            if first[0] is None and events:
                first[0] = time.perf_counter()
            got[0] += len(events)
            if got[0] >= want:
                done.set()

    kwargs = dict(on_event_batch=on_batch, starting_position="-1", max_batch_size=300,
                  prefetch=300, max_wait_time=2)
    if partition_id is not None:
        kwargs["partition_id"] = partition_id
    start = time.perf_counter()
    t = threading.Thread(target=lambda: client.receive_batch(**kwargs), daemon=True)
    t.start()
    done.wait(timeout)
    end = time.perf_counter()
    client.close()
    t.join(15)
    if got[0] < want:
        raise SystemExit("partition %s: %d of %d events" % (partition_id, got[0], want))
    return {"events": got[0], "seconds": end - start, "events_per_s": got[0] / (end - start),
            "first_event_s": (first[0] or end) - start}


def c2d(devices, total):
    rm = IoTHubRegistryManager(CREDS["service_connection_string"])
    rm.send_c2d_message(devices[0], "warm-up")  # opens the AMQP link
    start = time.perf_counter()
    for i in range(total):
        rm.send_c2d_message(devices[i % len(devices)], "c2d-%d" % i)
    end = time.perf_counter()
    return {"messages": total, "seconds": end - start, "sends_per_s": total / (end - start)}


def main():
    one = read("0", EXPECTED[0])
    every = read(None, sum(EXPECTED))
    sends = c2d(json.loads(os.environ["MERIDIAN_C2D_DEVICES"]), int(os.environ["MERIDIAN_C2D_MESSAGES"]))
    print("RESULT " + json.dumps({"partition0": one, "all": every, "c2d": sends}), flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
