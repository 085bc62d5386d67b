//! Fuzzes everything the device endpoint does to bytes from the network before any I/O: MQTT
//! packet decoding, client ids, SAS tokens, topics, property bags, telemetry records.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meridian::mqtt::exercise_untrusted_input(data);
});
