#!/usr/bin/env python3
"""Black-box test: the official Python service SDK (azure-iot-hub 2.7.0) against Meridian.

Drives IoTHubRegistryManager (REST, api-version 2021-04-12) through device CRUD, ETag
concurrency, twin patch/replace semantics, twin limits, statistics and module CRUD.

Environment:
  MERIDIAN_CONNECTION_STRING  required, "HostName=localhost:PORT;SharedAccessKeyName=iothubowner;SharedAccessKey=..."
  MERIDIAN_CA_CERT            PEM file with the test CA; exported as REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE
                              (overrides the image preset) before the client is built
  MERIDIAN_TEST_PREFIX        device id prefix (default: "sdkpy-<random>")
  MERIDIAN_TEST_TIMEOUT       watchdog seconds for the whole run (default 120)
  MERIDIAN_HTTP_TIMEOUT       per-request socket timeout in seconds (default 20; SDK default is 100)

Run with the venv made by node/tests/sdk/setup.sh:
  ~/.cache/meridian-sdk/venv/bin/python node/tests/sdk/service_registry.py
or with any python3 (it re-execs itself with that venv's python when azure-iot-hub is not importable).

Output: one "ok <step>" line per passed step, then "PASS service_registry.py".
Exit codes: 0 all passed, 1 a step failed (traceback printed), 2 watchdog timeout.
"""

import os
import signal
import sys
import traceback
import uuid

CURRENT_STEP = "startup"


def _watchdog(signum, frame):
    sys.stdout.flush()
    sys.stderr.write("TIMEOUT: watchdog fired during step '%s'; stack:\n" % CURRENT_STEP)
    traceback.print_stack(frame, file=sys.stderr)
    sys.stderr.flush()
    os._exit(2)


signal.signal(signal.SIGALRM, _watchdog)
signal.alarm(int(os.environ.get("MERIDIAN_TEST_TIMEOUT", "120")))

CONN = os.environ.get("MERIDIAN_CONNECTION_STRING")
CA = os.environ.get("MERIDIAN_CA_CERT")
PREFIX = os.environ.get("MERIDIAN_TEST_PREFIX") or ("sdkpy-" + uuid.uuid4().hex[:8])
HTTP_TIMEOUT = int(os.environ.get("MERIDIAN_HTTP_TIMEOUT", "20"))

if CA:
    # requests (under msrest) reads REQUESTS_CA_BUNDLE, then CURL_CA_BUNDLE, when verify=True and
    # trust_env=True. The build image presets both to the system bundle, so override both.
    os.environ["REQUESTS_CA_BUNDLE"] = CA
    os.environ["CURL_CA_BUNDLE"] = CA

try:
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import Twin, TwinProperties
except ImportError:
    # Not running inside the SDK venv: re-exec with the venv python made by setup.sh, if present.
    _cache = os.environ.get("MERIDIAN_SDK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meridian-sdk")
    _venv_py = os.path.join(_cache, "venv", "bin", "python")
    if os.path.exists(_venv_py) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(_cache, "venv")):
        sys.stdout.flush()
        os.execv(_venv_py, [_venv_py, os.path.abspath(__file__)] + sys.argv[1:])
    sys.stderr.write("azure-iot-hub is not importable; run node/tests/sdk/setup.sh first\n")
    raise


class StepFailure(AssertionError):
    pass


def ok(step):
    print("ok %s" % step, flush=True)


def begin(step):
    global CURRENT_STEP
    CURRENT_STEP = step


def check(cond, msg, *args):
    if not cond:
        raise StepFailure("[%s] %s" % (CURRENT_STEP, msg % args if args else msg))


def eq(got, want, what):
    check(got == want, "%s: got %r, want %r", what, got, want)


def status_of(exc):
    """HTTP status carried by an SDK exception (msrest HttpOperationError: .response.status_code)."""
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def expect_status(code, fn, *args, **kwargs):
    """Call fn, require it to raise an HttpOperationError whose response status is `code`."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any SDK exception is inspected below
        got = status_of(exc)
        if got is None:
            raise StepFailure(
                "[%s] expected HTTP %d, got exception without HTTP status: %r" % (CURRENT_STEP, code, exc)
            ) from exc
        if got != code:
            body = getattr(getattr(exc, "response", None), "text", "")
            raise StepFailure(
                "[%s] expected HTTP %d, got %d (body %r)" % (CURRENT_STEP, code, got, body[:300])
            ) from exc
        return exc
    raise StepFailure("[%s] expected HTTP %d, but the call succeeded: %r" % (CURRENT_STEP, code, result))


def user_keys(props):
    """Non-system keys of a desired/reported dict ($metadata, $version excluded)."""
    return {k: v for k, v in (props or {}).items() if not k.startswith("$")}


def keys_of(identity):
    auth = identity.authentication
    check(auth is not None, "identity has no authentication")
    check(auth.symmetric_key is not None, "identity has no symmetricKey")
    return auth.symmetric_key.primary_key, auth.symmetric_key.secondary_key


def main():
    if not CONN:
        print("MERIDIAN_CONNECTION_STRING is not set", file=sys.stderr)
        return 1
    if not CA:
        print("warning: MERIDIAN_CA_CERT is not set; using the preset REQUESTS_CA_BUNDLE", file=sys.stderr)

    rm = IoTHubRegistryManager.from_connection_string(CONN)
    # Bound each HTTP request (SDK default: 100 s connect/read timeout, urllib3 retries kept as-is).
    rm.protocol.config.connection.timeout = HTTP_TIMEOUT

    dev = PREFIX + "-dev"
    mod = "m1"
    device_deleted = False

    try:
        # ------------------------------------------------------------ devices
        begin("create_device")
        d = rm.create_device_with_sas(dev, "", "", "enabled")
        eq(d.device_id, dev, "deviceId")
        pk, sk = keys_of(d)
        check(bool(pk) and bool(sk), "server must generate keys, got primary=%r secondary=%r", pk, sk)
        check(pk != sk, "generated primary and secondary keys are identical")
        eq(d.authentication.type, "sas", "authentication.type")
        check(bool(d.etag), "etag missing: %r", d.etag)
        eq(d.status, "enabled", "status")
        eq(d.connection_state, "Disconnected", "connectionState")
        ok("create_device")

        begin("get_device")
        g = rm.get_device(dev)
        eq(g.device_id, dev, "deviceId")
        eq(g.etag, d.etag, "etag")
        eq(keys_of(g), (pk, sk), "keys")
        eq(g.status, "enabled", "status")
        ok("get_device")

        begin("update_device")
        u = rm.update_device_with_sas(dev, d.etag, pk, sk, "disabled")
        eq(u.device_id, dev, "deviceId")
        eq(u.status, "disabled", "status")
        check(bool(u.etag) and u.etag != d.etag, "etag must change on update: old %r new %r", d.etag, u.etag)
        eq(keys_of(u), (pk, sk), "keys after update")
        ok("update_device")

        begin("update_device_stale_etag_412")
        expect_status(412, rm.update_device_with_sas, dev, d.etag, pk, sk, "enabled")
        g = rm.get_device(dev)
        eq(g.status, "disabled", "status after rejected update")
        eq(g.etag, u.etag, "etag after rejected update")
        ok("update_device_stale_etag_412")

        begin("create_device_conflict_409")
        expect_status(409, rm.create_device_with_sas, dev, "", "", "enabled")
        eq(keys_of(rm.get_device(dev)), (pk, sk), "keys after rejected create")
        ok("create_device_conflict_409")

        # ------------------------------------------------------------ twins
        begin("get_twin")
        t = rm.get_twin(dev)
        eq(t.device_id, dev, "twin deviceId")
        check(t.tags in (None, {}), "new twin must have no tags, got %r", t.tags)
        check(t.properties is not None and t.properties.desired is not None, "twin has no properties.desired")
        eq(t.properties.desired.get("$version"), 1, "desired $version")
        eq(user_keys(t.properties.desired), {}, "desired user properties")
        check(bool(t.etag), "twin etag missing")
        ok("get_twin")

        begin("update_twin")
        t2 = rm.update_twin(
            dev, Twin(tags={"site": "a"}, properties=TwinProperties(desired={"t": 1})), t.etag
        )
        eq(t2.tags, {"site": "a"}, "tags")
        eq(t2.properties.desired.get("t"), 1, "desired.t")
        eq(t2.properties.desired.get("$version"), 2, "desired $version")
        check(bool(t2.etag) and t2.etag != t.etag, "twin etag must change: old %r new %r", t.etag, t2.etag)
        ok("update_twin")

        begin("update_twin_stale_etag_412")
        expect_status(412, rm.update_twin, dev, Twin(tags={"site": "stale"}), t.etag)
        tc = rm.get_twin(dev)
        eq(tc.tags, {"site": "a"}, "tags after rejected patch")
        eq(tc.etag, t2.etag, "twin etag after rejected patch")
        ok("update_twin_stale_etag_412")

        begin("update_twin_null_deletes")
        t3 = rm.update_twin(dev, Twin(properties=TwinProperties(desired={"t": None, "u": 2})), "*")
        check("t" not in t3.properties.desired, "desired.t must be deleted, got %r", t3.properties.desired)
        eq(t3.properties.desired.get("u"), 2, "desired.u")
        eq(user_keys(t3.properties.desired), {"u": 2}, "desired user properties")
        eq(t3.tags, {"site": "a"}, "tags untouched by desired-only patch")
        v3 = t3.properties.desired.get("$version")
        check(isinstance(v3, int) and v3 > 2, "desired $version must increase past 2, got %r", v3)
        ok("update_twin_null_deletes")

        begin("replace_twin")
        t4 = rm.replace_twin(
            dev, Twin(tags={"only": "b"}, properties=TwinProperties(desired={"v": 3})), t3.etag
        )
        eq(t4.tags, {"only": "b"}, "tags after replace")
        eq(t4.properties.desired.get("v"), 3, "desired.v")
        check("u" not in t4.properties.desired, "desired.u must be gone after replace: %r", t4.properties.desired)
        eq(user_keys(t4.properties.desired), {"v": 3}, "desired user properties after replace")
        v4 = t4.properties.desired.get("$version")
        check(isinstance(v4, int) and v4 > v3, "desired $version must increase past %r, got %r", v3, v4)
        tr = rm.get_twin(dev)
        eq(tr.tags, {"only": "b"}, "tags re-read")
        eq(user_keys(tr.properties.desired), {"v": 3}, "desired re-read")
        eq(tr.etag, t4.etag, "etag re-read")
        ok("replace_twin")

        begin("twin_oversize_400")
        # 20 x 500-char strings (each <= 512 bytes) = ~10 KB > 8 KB desired limit.
        big = {"k%02d" % i: "x" * 500 for i in range(20)}
        expect_status(400, rm.update_twin, dev, Twin(properties=TwinProperties(desired=big)), "*")
        tr = rm.get_twin(dev)
        eq(user_keys(tr.properties.desired), {"v": 3}, "desired after rejected oversize patch")
        eq(tr.properties.desired.get("$version"), v4, "desired $version after rejected oversize patch")
        ok("twin_oversize_400")

        begin("twin_too_deep_400")
        deep = {"leaf": 1}
        for i in range(7):  # 7 nested objects under desired (limit: depth 5)
            deep = {"n%d" % i: deep}
        expect_status(400, rm.update_twin, dev, Twin(properties=TwinProperties(desired=deep)), "*")
        tr = rm.get_twin(dev)
        eq(user_keys(tr.properties.desired), {"v": 3}, "desired after rejected deep patch")
        ok("twin_too_deep_400")

        # ------------------------------------------------------------ listing / statistics
        begin("get_devices")
        devices = rm.get_devices(1000)
        check(isinstance(devices, list), "get_devices returned %r", type(devices))
        ids = [x.device_id for x in devices]
        check(dev in ids, "device %r not in get_devices(1000) (%d devices)", dev, len(ids))
        ok("get_devices")

        begin("service_statistics")
        s = rm.get_service_statistics()
        check(hasattr(s, "connected_device_count"), "no connected_device_count attribute")
        check(
            isinstance(s.connected_device_count, int) and s.connected_device_count >= 0,
            "connected_device_count must be a non-negative int, got %r", s.connected_device_count,
        )
        ok("service_statistics")

        begin("registry_statistics")
        r = rm.get_device_registry_statistics()
        check(
            isinstance(r.total_device_count, int) and r.total_device_count >= 1,
            "total_device_count must be an int >= 1, got %r", r.total_device_count,
        )
        for name in ("enabled_device_count", "disabled_device_count"):
            val = getattr(r, name)
            check(val is None or isinstance(val, int), "%s must be int, got %r", name, val)
        ok("registry_statistics")

        # ------------------------------------------------------------ modules
        begin("create_module")
        # SDK name is create_module_with_sas(device_id, module_id, managed_by, primary_key, secondary_key)
        m = rm.create_module_with_sas(dev, mod, "", "", "")
        eq(m.device_id, dev, "module deviceId")
        eq(m.module_id, mod, "moduleId")
        check(bool(m.etag), "module etag missing")
        mpk, msk = keys_of(m)
        check(bool(mpk) and bool(msk), "server must generate module keys, got %r / %r", mpk, msk)
        ok("create_module")

        begin("get_module")
        gm = rm.get_module(dev, mod)
        eq((gm.device_id, gm.module_id), (dev, mod), "module ids")
        eq(gm.etag, m.etag, "module etag")
        eq(keys_of(gm), (mpk, msk), "module keys")
        ok("get_module")

        begin("get_modules")
        mods = rm.get_modules(dev)
        check(mod in [x.module_id for x in mods], "module %r not in get_modules: %r", mod, mods)
        ok("get_modules")

        begin("get_module_twin")
        mt = rm.get_module_twin(dev, mod)
        eq((mt.device_id, mt.module_id), (dev, mod), "module twin ids")
        check(mt.tags in (None, {}), "new module twin must have no tags, got %r", mt.tags)
        eq(mt.properties.desired.get("$version"), 1, "module desired $version")
        check(bool(mt.etag), "module twin etag missing")
        ok("get_module_twin")

        begin("update_module_twin")
        mt2 = rm.update_module_twin(dev, mod, Twin(tags={"role": "x"}), mt.etag)
        eq(mt2.tags, {"role": "x"}, "module twin tags")
        eq(mt2.module_id, mod, "module twin moduleId")
        check(mt2.etag != mt.etag, "module twin etag must change")
        eq(rm.get_module_twin(dev, mod).tags, {"role": "x"}, "module twin tags re-read")
        eq(rm.get_twin(dev).tags, {"only": "b"}, "device twin tags unaffected by module twin")
        ok("update_module_twin")

        begin("delete_module")
        rm.delete_module(dev, mod)
        expect_status(404, rm.get_module, dev, mod)
        expect_status(404, rm.get_module_twin, dev, mod)
        ok("delete_module")

        # ------------------------------------------------------------ delete device
        begin("delete_device")
        rm.delete_device(dev)
        device_deleted = True
        expect_status(404, rm.get_device, dev)
        expect_status(404, rm.get_twin, dev)
        expect_status(404, rm.delete_device, dev)
        ok("delete_device")
    finally:
        if not device_deleted:
            try:
                rm.delete_device(dev)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    except Exception:  # noqa: BLE001
        sys.stdout.flush()
        print("FAIL service_registry.py in step '%s'" % CURRENT_STEP, file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if rc == 0:
        print("PASS service_registry.py", flush=True)
    sys.stderr.flush()
    # os._exit skips the SDK's __del__ (uamqp client teardown) at interpreter shutdown.
    os._exit(rc)
