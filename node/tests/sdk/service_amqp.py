#!/usr/bin/env python3
"""Black-box test of Meridian's AMQP endpoint with the official Python clients, unmodified:
C2D sends with azure-iot-hub 2.7.0 (uamqp) to a device connected over MQTT with azure-iot-device
2.14.0, and telemetry reads from the Event Hub-compatible endpoint with azure-eventhub 5.15.1
(pyamqp), with and without logging_enable=True.

Steps (each prints "ok <step>"): create_devices, connect, c2d, c2d_unknown_device, c2d_queue_full,
c2d_wrong_key, c2d_no_permission, telemetry, eh_properties, eh_from_start, eh_from_start_logging,
eh_from_offset, eh_from_sequence, eh_from_enqueued_time, eh_checkpoint_restart, eh_wrong_key.

Environment:
  MERIDIAN_CREDENTIALS   required, the node's dev-credentials.json (connection string, CA, policies)
  MERIDIAN_MQTT_PORT     required, MQTT/TLS port (the device SDK dials 8883; a SOCKS5 relay maps it)
  MERIDIAN_HTTPS_PORT    required, HTTPS port, where AMQP is served too (pyamqp's custom endpoint)
  MERIDIAN_EVENT_HUB     required, the Event Hub-compatible name
  MERIDIAN_TEST_TIMEOUT  watchdog seconds (default 240)

uamqp (azure-iot-hub) always dials port 5671 of the HostName's host and trusts certifi's bundle:
the node under test listens on 127.0.0.1:5671, and certifi.where() is pointed at the test CA (the
trust configuration, not the SDK, changes). pyamqp trusts connection_verify=<CA>.
Exit codes: 0 all passed, 1 a step failed, 2 watchdog timeout.
"""

import datetime
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import device_e2e as dev  # noqa: E402  (SOCKS5 relay, device client helper; re-execs into the venv)

CURRENT = "startup"


def _watchdog(signum, frame):
    sys.stderr.write("TIMEOUT in step %s\n" % CURRENT)
    traceback.print_stack(frame, file=sys.stderr)
    os._exit(2)


signal.signal(signal.SIGALRM, _watchdog)
signal.alarm(int(os.environ.get("MERIDIAN_TEST_TIMEOUT", "240")))

CREDS = json.load(open(os.environ["MERIDIAN_CREDENTIALS"]))
CA = CREDS["ca_cert"]
os.environ["REQUESTS_CA_BUNDLE"] = CA
os.environ["CURL_CA_BUNDLE"] = CA
import certifi  # noqa: E402

certifi.where = lambda: CA  # uamqp reads its trust bundle from certifi.where() at connect time

from azure.eventhub import CheckpointStore, EventHubConsumerClient  # noqa: E402
from azure.iot.hub import IoTHubRegistryManager  # noqa: E402
from azure.iot.device import Message  # noqa: E402

SERVICE_CS = CREDS["service_connection_string"]
HOST = dict(p.split("=", 1) for p in SERVICE_CS.split(";"))["HostName"]
POLICIES = {p["keyName"]: p for p in CREDS["shared_access_policies"]}
MQTT_PORT = int(os.environ["MERIDIAN_MQTT_PORT"])
HTTPS_PORT = int(os.environ["MERIDIAN_HTTPS_PORT"])
EVENT_HUB = os.environ["MERIDIAN_EVENT_HUB"]
PREFIX = "amqp-" + uuid.uuid4().hex[:6] + "-"


def begin(step):
    global CURRENT
    CURRENT = step


def ok(step):
    print("ok " + step, flush=True)


def check(cond, msg):
    if not cond:
        raise AssertionError("%s: %s" % (CURRENT, msg))


def cs_for(policy, key=None):
    p = POLICIES[policy]
    return "HostName=%s;SharedAccessKeyName=%s;SharedAccessKey=%s" % (
        HOST, policy, key or p["primaryKey"])


def eh_cs(policy="service", key=None):
    p = POLICIES[policy]
    return "Endpoint=sb://localhost/;SharedAccessKeyName=%s;SharedAccessKey=%s;EntityPath=%s" % (
        policy, key or p["primaryKey"], EVENT_HUB)


def consumer(logging_enable=False, checkpoint_store=None, policy="service", key=None):
    return EventHubConsumerClient.from_connection_string(
        eh_cs(policy, key),
        consumer_group="$Default",
        connection_verify=CA,
        custom_endpoint_address="sb://localhost:%d" % HTTPS_PORT,
        logging_enable=logging_enable,
        checkpoint_store=checkpoint_store,
    )


def expect_failure(what, fn):
    try:
        fn()
    except Exception as e:  # the SDK's own exception types differ between versions
        return e
    raise AssertionError("%s: %s succeeded" % (CURRENT, what))


def collect(client, want, timeout=40, prefix=None, **receive_kwargs):
    """Receives until `want(events)` holds; returns our events (bodies with `prefix`, default
    PREFIX) in order."""
    prefix = prefix or PREFIX
    events = []
    done = threading.Event()
    lock = threading.Lock()

    def on_event(ctx, event):
        if event is None:
            return
        body = event.body_as_str()
        if not body.startswith(prefix):
            return
        with lock:
            events.append((ctx.partition_id, event))
            if want(events):
                done.set()

    t = threading.Thread(
        target=lambda: client.receive(on_event=on_event, max_wait_time=1, **receive_kwargs),
        daemon=True)
    t.start()
    done.wait(timeout)
    client.close()
    t.join(15)
    with lock:
        check(want(events), "only %d events arrived: %s" % (
            len(events), [e.body_as_str() for _, e in events]))
        return list(events)


def partition_of(device_id, partitions):
    """Meridian's partition of a device: FNV-1a 64 of the id, modulo the partition count."""
    h = 0xCBF29CE484222325
    for b in device_id.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % partitions


def seq_of(event):
    return json.loads(event.body_as_str()[len(PREFIX):])["seq"]


class MemoryCheckpointStore(CheckpointStore):
    """A checkpoint store in memory: what a blob store keeps, for a restart within one process."""

    def __init__(self):
        self.ownership = {}
        self.checkpoints = {}

    def list_ownership(self, fully_qualified_namespace, eventhub_name, consumer_group, **kwargs):
        return [dict(o) for o in self.ownership.values()]

    def claim_ownership(self, ownership_list, **kwargs):
        claimed = []
        for o in ownership_list:
            o = dict(o)
            o["etag"] = uuid.uuid4().hex
            o["last_modified_time"] = time.time()
            self.ownership[o["partition_id"]] = o
            claimed.append(o)
        return claimed

    def update_checkpoint(self, checkpoint, **kwargs):
        self.checkpoints[checkpoint["partition_id"]] = dict(checkpoint)

    def list_checkpoints(self, fully_qualified_namespace, eventhub_name, consumer_group, **kwargs):
        return [dict(c) for c in self.checkpoints.values()]


def main():
    rm = IoTHubRegistryManager(cs_for("iothubowner"))
    begin("create_devices")
    d1, full = PREFIX + "d1", PREFIX + "full"
    created = {}
    for d in (d1, full):
        created[d] = rm.create_device_with_sas(d, None, None, "enabled")
    ok("create_devices")

    begin("connect")
    relay = dev.Socks5Redirector({8883: MQTT_PORT, 443: HTTPS_PORT})
    proxy = dev.ProxyOptions(proxy_type="SOCKS5", proxy_addr="127.0.0.1", proxy_port=relay.port)
    key = created[d1].authentication.symmetric_key.primary_key
    device = dev.make_device_client(
        "HostName=localhost;DeviceId=%s;SharedAccessKey=%s" % (d1, key), open(CA).read(), proxy, False)
    device.connect()
    inbox = queue.Queue()
    device.on_message_received = inbox.put
    ok("connect")

    begin("c2d")
    mid = "amqp-" + uuid.uuid4().hex
    t0 = time.time()
    rm.send_c2d_message(d1, "hello over amqp", properties={
        "iothub-ack": "full", "messageId": mid, "contentType": "text/plain",
        "correlationId": "corr-1", "color": "blue"})
    sent_s = time.time() - t0
    m = inbox.get(timeout=20)
    check(m.data == b"hello over amqp", "body %r" % m.data)
    check(m.message_id == mid, "message id %r" % m.message_id)
    check(m.correlation_id == "corr-1", "correlation id %r" % m.correlation_id)
    check(m.custom_properties.get("color") == "blue", "properties %r" % m.custom_properties)
    print("c2d send took %.3f s" % sent_s)
    ok("c2d")

    begin("c2d_unknown_device")
    expect_failure("send to an unknown device",
                   lambda: rm.send_c2d_message(PREFIX + "nobody", "x"))
    ok("c2d_unknown_device")

    begin("c2d_queue_full")
    for i in range(50):
        rm.send_c2d_message(full, "m%d" % i)
    expect_failure("the 51st message", lambda: rm.send_c2d_message(full, "m50"))
    ok("c2d_queue_full")

    begin("c2d_wrong_key")
    wrong = "A" * 43 + "="
    expect_failure("a send with a wrong key", lambda: IoTHubRegistryManager(
        cs_for("service", wrong)).send_c2d_message(d1, "x"))
    ok("c2d_wrong_key")

    begin("c2d_no_permission")
    # registryRead lacks ServiceConnect: the token is good, the devicebound link is refused.
    expect_failure("a send with registryRead", lambda: IoTHubRegistryManager(
        cs_for("registryRead")).send_c2d_message(d1, "x"))
    check(inbox.empty(), "a refused message arrived")
    ok("c2d_no_permission")

    begin("telemetry")
    n = 12
    for i in range(n):
        msg = Message(PREFIX + json.dumps({"seq": i}))
        msg.message_id = "%s-%d" % (PREFIX, i)
        msg.content_type = "application/json"
        msg.content_encoding = "utf-8"
        msg.custom_properties["seq"] = str(i)
        device.send_message(msg)
    ok("telemetry")

    begin("telemetry_every_partition")
    # Devices whose ids hash to every partition, each sending 3 messages.
    spread_prefix = "amqpx-" + uuid.uuid4().hex[:6] + "-"
    wanted, spread, j = set(range(4)), [], 0
    while wanted:
        candidate = "%sp%d" % (spread_prefix, j)
        j += 1
        p = partition_of(candidate, 4)
        if p in wanted:
            wanted.discard(p)
            spread.append(candidate)
    for d in spread:
        k = rm.create_device_with_sas(d, None, None, "enabled").authentication.symmetric_key.primary_key
        c = dev.make_device_client(
            "HostName=localhost;DeviceId=%s;SharedAccessKey=%s" % (d, k), open(CA).read(), proxy, False)
        c.connect()
        for i in range(3):
            c.send_message(Message(spread_prefix + json.dumps({"seq": i, "device": d})))
        c.shutdown()
    ok("telemetry_every_partition")

    begin("eh_properties")
    c = consumer()
    props = c.get_eventhub_properties()
    check(props["eventhub_name"] == EVENT_HUB, "name %r" % props)
    ids = props["partition_ids"]
    check(len(ids) >= 1, "partition ids %r" % ids)
    total = 0
    for pid in ids:
        pp = c.get_partition_properties(pid)
        check(pp["id"] == pid, "partition props %r" % pp)
        if not pp["is_empty"]:
            total += pp["last_enqueued_sequence_number"] - pp["beginning_sequence_number"] + 1
    check(total >= n, "partitions hold %d events, sent %d" % (total, n))
    c.close()
    ok("eh_properties")

    for step, logging in (("eh_from_start", False), ("eh_from_start_logging", True)):
        begin(step)
        events = collect(consumer(logging_enable=logging), lambda es: len(es) >= n,
                         starting_position="-1")
        seqs = sorted(seq_of(e) for _, e in events)
        check(seqs == list(range(n)), "sequence %r" % seqs)
        _, e = events[0]
        sysp = e.system_properties
        check(sysp.get(b"iothub-connection-device-id") == d1.encode(), "system %r" % sysp)
        check(sysp.get(b"content-type") == b"application/json", "content type %r" % sysp)
        check(sysp.get(b"message-id", b"").startswith(PREFIX.encode()), "message id %r" % sysp)
        check(e.properties.get(b"seq") == str(seq_of(e)).encode(), "properties %r" % e.properties)
        check(isinstance(e.enqueued_time, datetime.datetime), "enqueued %r" % e.enqueued_time)
        ok(step)

    begin("eh_every_partition")
    spread_events = collect(consumer(), lambda es: len(es) >= 3 * len(spread),
                            prefix=spread_prefix, starting_position="-1")
    partitions_seen = sorted({p for p, _ in spread_events})
    check(partitions_seen == sorted(ids), "events from partitions %r of %r" % (partitions_seen, ids))
    for p, e in spread_events:
        d = e.system_properties.get(b"iothub-connection-device-id", b"").decode()
        check(str(partition_of(d, 4)) == p, "%s read from partition %s" % (d, p))
    ok("eh_every_partition")

    by_seq = {seq_of(e): (p, e) for p, e in events}
    partition, fifth = by_seq[5]

    begin("eh_from_offset")
    got = collect(consumer(), lambda es: any(seq_of(e) == n - 1 for _, e in es),
                  partition_id=partition, starting_position=fifth.offset)
    check([seq_of(e) for _, e in got] == list(range(6, n)), "after offset: %r" % [seq_of(e) for _, e in got])
    ok("eh_from_offset")

    begin("eh_from_sequence")
    got = collect(consumer(), lambda es: any(seq_of(e) == n - 1 for _, e in es),
                  partition_id=partition, starting_position=fifth.sequence_number,
                  starting_position_inclusive=True)
    check([seq_of(e) for _, e in got] == list(range(5, n)), "from sequence: %r" % [seq_of(e) for _, e in got])
    ok("eh_from_sequence")

    begin("eh_from_enqueued_time")
    _, eighth = by_seq[8]
    got = collect(consumer(), lambda es: any(seq_of(e) == n - 1 for _, e in es),
                  partition_id=partition, starting_position=eighth.enqueued_time,
                  starting_position_inclusive=True)
    seqs = [seq_of(e) for _, e in got]
    check(seqs == list(range(seqs[0], n)) and seqs[0] <= 8, "from time: %r" % seqs)
    check(all(e.enqueued_time >= eighth.enqueued_time for _, e in got), "an earlier event")
    ok("eh_from_enqueued_time")

    begin("eh_checkpoint_restart")
    store = MemoryCheckpointStore()
    first = consumer(checkpoint_store=store)
    seen_first = []

    def on_event(ctx, event):
        if event is not None and event.body_as_str().startswith(PREFIX):
            seen_first.append(seq_of(event))
            ctx.update_checkpoint(event)
            if seq_of(event) == 6:
                threading.Thread(target=first.close, daemon=True).start()

    t = threading.Thread(target=lambda: first.receive(on_event=on_event, starting_position="-1"),
                         daemon=True)
    t.start()
    t.join(40)
    check(6 in seen_first, "first consumer saw %r" % seen_first)
    checkpointed = max(seen_first)
    for i in range(n, n + 4):
        msg = Message(PREFIX + json.dumps({"seq": i}))
        device.send_message(msg)
    # The restarted consumer ignores starting_position where a checkpoint exists.
    got = collect(consumer(checkpoint_store=store), lambda es: any(seq_of(e) == n + 3 for _, e in es),
                  starting_position="-1")
    seqs = [seq_of(e) for _, e in got]
    check(seqs == list(range(checkpointed + 1, n + 4)),
          "after the checkpoint at %d: %r" % (checkpointed, seqs))
    ok("eh_checkpoint_restart")

    begin("eh_wrong_key")
    bad = consumer(key="A" * 43 + "=")
    expect_failure("properties with a wrong key", bad.get_eventhub_properties)
    bad.close()
    ok("eh_wrong_key")

    device.shutdown()
    print("PASS service_amqp.py", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    os._exit(0)
