//! Device-to-cloud messages: the MQTT property bag, system properties, partitioning and the stored
//! record format.

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use super::error::{HubError, HubResult};

/// Largest telemetry message body by default (Azure: 256 KB); `[mqtt] max_telemetry_bytes`.
pub const MAX_TELEMETRY_BYTES: usize = 256 * 1024;

/// Characters left unescaped in property bags we send (RFC 3986 unreserved).
const BAG_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Maps the MQTT short names of system properties to their names in the stored message.
const SYSTEM_PROPERTIES: [(&str, &str); 8] = [
    ("$.mid", "message-id"),
    ("$.cid", "correlation-id"),
    ("$.uid", "user-id"),
    ("$.ct", "content-type"),
    ("$.ce", "content-encoding"),
    ("$.exp", "absolute-expiry-time"),
    ("$.on", "iothub-outputname"),
    ("$.ifid", "iothub-interface-id"),
];

/// Parses a property bag (`k=v&k2=v2`, percent-encoded; a bare key has an empty value).
pub fn parse_property_bag(bag: &str) -> HubResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in bag.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| HubError::invalid("property bag is not valid UTF-8 after decoding"))
        };
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

/// Encodes properties as a bag: every key and value percent-encoded, so `/`, `&`, `=` and `%`
/// never appear raw (the SDKs split topics on `/` before decoding).
pub fn encode_property_bag<'a>(props: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    props
        .into_iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, BAG_ESCAPE),
                utf8_percent_encode(v, BAG_ESCAPE)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A device-to-cloud message as stored in a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryMessage {
    /// System properties (`message-id`, `content-type`, `iothub-connection-device-id`, ...).
    pub system_properties: BTreeMap<String, String>,
    /// Application properties set by the device.
    pub application_properties: BTreeMap<String, String>,
    /// The body, as sent.
    #[serde(skip)]
    pub body: Vec<u8>,
}

/// Who sent a message: stamped by the hub from the authenticated connection, never from the
/// device's own properties (anti-spoofing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    /// Device id.
    pub device_id: String,
    /// Module id, for module connections.
    pub module_id: Option<String>,
    /// The identity's generation id.
    pub generation_id: String,
    /// `sasToken` or `x509Certificate` (Azure's `iothub-connection-auth-method` type).
    pub auth_type: &'static str,
}

impl Sender {
    /// Azure's `iothub-connection-auth-method` value for this sender: one of the stored form's
    /// well-known values (no formatting per message) for the auth types the hub has.
    pub fn auth_method(&self) -> std::borrow::Cow<'static, str> {
        let scope = if self.module_id.is_some() {
            "module"
        } else {
            "device"
        };
        match (scope, self.auth_type) {
            ("device", "sasToken") => STORED_VALUES[0].into(),
            ("device", "x509Certificate") => STORED_VALUES[1].into(),
            ("module", "sasToken") => STORED_VALUES[2].into(),
            ("module", "x509Certificate") => STORED_VALUES[3].into(),
            (scope, auth_type) => {
                format!("{{\"scope\":\"{scope}\",\"type\":\"{auth_type}\",\"issuer\":\"iothub\"}}")
                    .into()
            }
        }
    }
}

impl TelemetryMessage {
    /// Builds a message from a topic's property bag and body, stamping the hub's properties.
    pub fn from_device(
        bag: &str,
        body: Vec<u8>,
        sender: &Sender,
        enqueued_time: &str,
        retain: bool,
        max_bytes: usize,
    ) -> HubResult<Self> {
        check_body_size(body.len(), max_bytes)?;
        let mut system = BTreeMap::new();
        let mut application = BTreeMap::new();
        for (k, v) in parse_property_bag(bag)? {
            match SYSTEM_PROPERTIES.iter().find(|(short, _)| *short == k) {
                Some((_, long)) => {
                    system.insert((*long).to_string(), v);
                }
                // Any other `$`-prefixed key is a system property we do not let devices set.
                None if k.starts_with('$') => {}
                None => {
                    application.insert(k, v);
                }
            }
        }
        if retain {
            // MQTT retain has no meaning for a hub; Azure keeps it as an application property.
            application.insert("x-opt-retain".into(), "1".into());
        }
        system.insert(
            "iothub-connection-device-id".into(),
            sender.device_id.clone(),
        );
        if let Some(m) = &sender.module_id {
            system.insert("iothub-connection-module-id".into(), m.clone());
        }
        system.insert(
            "iothub-connection-auth-generation-id".into(),
            sender.generation_id.clone(),
        );
        system.insert(
            "iothub-connection-auth-method".into(),
            sender.auth_method().into_owned(),
        );
        system.insert("iothub-enqueuedtime".into(), enqueued_time.to_string());
        system.insert("iothub-message-source".into(), "Telemetry".into());
        Ok(Self {
            system_properties: system,
            application_properties: application,
            body,
        })
    }

    /// The stored form of [`Self::from_device`] with the same arguments, byte for byte, without
    /// building the message: a hub without routes needs nothing but these bytes, and the two
    /// property maps cost a dozen allocations per message on the ingest path.
    pub fn encode_from_device(
        bag: &str,
        body: &[u8],
        sender: &Sender,
        enqueued_time: &str,
        retain: bool,
        max_bytes: usize,
    ) -> HubResult<Vec<u8>> {
        check_body_size(body.len(), max_bytes)?;
        let parsed = parse_property_bag(bag)?;
        let auth_method = sender.auth_method();
        // In the order `from_device` inserts them; `by_name_last_wins` then gives the maps' view.
        let mut system: Vec<(&str, &str)> = Vec::with_capacity(parsed.len() + 6);
        let mut application: Vec<(&str, &str)> = Vec::new();
        for (k, v) in &parsed {
            match SYSTEM_PROPERTIES.iter().find(|(short, _)| short == k) {
                Some((_, long)) => system.push((long, v)),
                None if k.starts_with('$') => {}
                None => application.push((k, v)),
            }
        }
        if retain {
            application.push(("x-opt-retain", "1"));
        }
        system.push(("iothub-connection-device-id", &sender.device_id));
        if let Some(m) = &sender.module_id {
            system.push(("iothub-connection-module-id", m));
        }
        system.push((
            "iothub-connection-auth-generation-id",
            &sender.generation_id,
        ));
        system.push(("iothub-connection-auth-method", &auth_method));
        system.push(("iothub-enqueuedtime", enqueued_time));
        system.push(("iothub-message-source", "Telemetry"));
        let header = StoredHeader {
            system: by_name_last_wins(system)
                .into_iter()
                .map(|(k, v)| (StoredName::of(k), StoredValue::of(v)))
                .collect(),
            application: by_name_last_wins(application),
        };
        match encode_stored(&header, body) {
            Some(out) => Ok(out),
            None => Ok(Self::from_device(
                bag,
                body.to_vec(),
                sender,
                enqueued_time,
                retain,
                max_bytes,
            )?
            .encode()),
        }
    }

    /// Stored form: the byte [`COMPACT_HEADER`], the properties in postcard (well-known system
    /// property names and values as one-byte codes, timestamps and numbers as varints), then the
    /// body. Every stored byte is written twice and copied several times on the way (ADR 017).
    pub fn encode(&self) -> Vec<u8> {
        // Not reachable for strings and vectors; the JSON form stays readable regardless.
        encode_stored(&self.stored_header(), &self.body).unwrap_or_else(|| self.encode_json())
    }

    /// The properties as the stored form's header.
    fn stored_header(&self) -> StoredHeader<'_> {
        StoredHeader {
            system: self
                .system_properties
                .iter()
                .map(|(k, v)| (StoredName::of(k), StoredValue::of(v)))
                .collect(),
            application: self
                .application_properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        }
    }

    /// The first stored form: 4-byte big-endian header length, JSON header, body. Still read.
    fn encode_json(&self) -> Vec<u8> {
        let header = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + header.len() + self.body.len());
        out.extend_from_slice(&(header.len() as u32).to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads any stored form back (`None`: not a stored message).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (header, body) = match bytes.split_first() {
            Some((&COMPACT_HEADER, rest)) => {
                postcard::take_from_bytes::<StoredHeader<'_>>(rest).ok()?
            }
            // The earlier binary form: every value is text.
            Some((&BINARY_HEADER, rest)) => {
                let (text, body) = postcard::take_from_bytes::<TextHeader<'_>>(rest).ok()?;
                let system = text
                    .system
                    .into_iter()
                    .map(|(name, value)| (name, StoredValue::Text(value)))
                    .collect();
                let header = StoredHeader {
                    system,
                    application: text.application,
                };
                (header, body)
            }
            _ => return Self::decode_json(bytes),
        };
        let mut system_properties = BTreeMap::new();
        for (name, value) in header.system {
            system_properties.insert(name.as_str()?.to_string(), value.text()?);
        }
        Some(Self {
            system_properties,
            application_properties: header
                .application
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        })
    }

    /// The first stored form: 4-byte big-endian header length, JSON header, body.
    fn decode_json(bytes: &[u8]) -> Option<Self> {
        let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let header = bytes.get(4..4usize.checked_add(len)?)?;
        let mut message: TelemetryMessage = serde_json::from_slice(header).ok()?;
        message.body = bytes.get(4 + len..)?.to_vec();
        Some(message)
    }
}

/// First byte of the second stored form, with system property values as text. Still read. The
/// JSON form starts with a big-endian header length, whose first byte is 0 for any header under
/// 16 MiB, so the forms never collide.
const BINARY_HEADER: u8 = 0xFF;

/// First byte of the stored form written now: system property values as [`StoredValue`]s.
const COMPACT_HEADER: u8 = 0xFE;

/// System property values stored as their index. Append only: an index, once written, is forever.
/// The hub stamps each of these on every message of its kind.
const STORED_VALUES: [&str; 8] = [
    r#"{"scope":"device","type":"sasToken","issuer":"iothub"}"#,
    r#"{"scope":"device","type":"x509Certificate","issuer":"iothub"}"#,
    r#"{"scope":"module","type":"sasToken","issuer":"iothub"}"#,
    r#"{"scope":"module","type":"x509Certificate","issuer":"iothub"}"#,
    "Telemetry",
    "twinChangeEvents",
    "deviceLifecycleEvents",
    "deviceConnectionStateEvents",
];

/// A system property value in the compact stored form. Every variant but `Text` is chosen only
/// when it reads back as exactly the same text, so the form is lossless.
#[derive(Serialize, Deserialize)]
enum StoredValue<'a> {
    Text(&'a str),
    /// An index into [`STORED_VALUES`].
    Known(u8),
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ` (the hub's enqueued times), as ms since the Unix epoch.
    Millis(u64),
    /// A decimal number without leading zeros (generation ids, many message ids).
    Number(u64),
}

impl<'a> StoredValue<'a> {
    fn of(value: &'a str) -> Self {
        if let Some(i) = STORED_VALUES.iter().position(|v| *v == value) {
            return StoredValue::Known(i as u8);
        }
        if let Some(ms) = parse_millis(value) {
            return StoredValue::Millis(ms);
        }
        if let Some(n) = parse_canonical_number(value) {
            return StoredValue::Number(n);
        }
        StoredValue::Text(value)
    }

    fn text(&self) -> Option<String> {
        match self {
            StoredValue::Text(text) => Some((*text).to_string()),
            StoredValue::Known(i) => STORED_VALUES.get(usize::from(*i)).map(|v| v.to_string()),
            StoredValue::Millis(ms) => format_millis(*ms),
            StoredValue::Number(n) => Some(n.to_string()),
        }
    }

    /// At least the length postcard gives this value (the variant tag and the payload).
    fn len_bound(&self) -> usize {
        match self {
            StoredValue::Text(text) => 1 + 3 + text.len(),
            StoredValue::Known(_) => 2,
            StoredValue::Millis(n) | StoredValue::Number(n) => 1 + varint_len(*n),
        }
    }
}

/// Bytes of `n` as a postcard (LEB128) varint.
fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// A decimal number as written by `u64::to_string`: digits only, no sign, no leading zero.
fn parse_canonical_number(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() > 20 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes[0] == b'0' {
        return None;
    }
    text.parse().ok()
}

/// Milliseconds since the Unix epoch of a `YYYY-MM-DDTHH:MM:SS.mmmZ` time from 1970 on, the only
/// spelling [`format_millis`] gives back for it. Anything else (offsets, other precisions, leap
/// seconds, impossible dates) is `None` and stays text.
fn parse_millis(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 24 {
        return None;
    }
    let punctuation = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ];
    if punctuation.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u64> {
        b[from..to].iter().try_fold(0u64, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
        })
    };
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second, milli) = (
        number(11, 13)?,
        number(14, 16)?,
        number(17, 19)?,
        number(20, 23)?,
    );
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if year < 1970 || day == 0 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli)
}

/// Days from 1970-01-01 to a date from 1970 on (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The hub's timestamp text (`clock::iso_now`'s format) of ms since the Unix epoch.
fn format_millis(ms: u64) -> Option<String> {
    let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(i64::try_from(ms).ok()?)?;
    Some(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// System property names stored as their index. Append only: an index, once written, is forever.
const STORED_NAMES: [&str; 14] = [
    "iothub-connection-device-id",
    "iothub-connection-module-id",
    "iothub-connection-auth-generation-id",
    "iothub-connection-auth-method",
    "iothub-enqueuedtime",
    "iothub-message-source",
    "message-id",
    "correlation-id",
    "user-id",
    "content-type",
    "content-encoding",
    "absolute-expiry-time",
    "iothub-outputname",
    "iothub-interface-id",
];

#[derive(Serialize, Deserialize)]
enum StoredName<'a> {
    Known(u8),
    Other(&'a str),
}

impl<'a> StoredName<'a> {
    fn of(name: &'a str) -> Self {
        match STORED_NAMES.iter().position(|n| *n == name) {
            Some(i) => StoredName::Known(i as u8),
            None => StoredName::Other(name),
        }
    }

    fn as_str(&self) -> Option<&'a str> {
        match self {
            StoredName::Known(i) => STORED_NAMES.get(usize::from(*i)).copied(),
            StoredName::Other(name) => Some(name),
        }
    }
}

/// The properties of the compact stored form ([`COMPACT_HEADER`]).
#[derive(Serialize, Deserialize)]
struct StoredHeader<'a> {
    #[serde(borrow)]
    system: Vec<(StoredName<'a>, StoredValue<'a>)>,
    #[serde(borrow)]
    application: Vec<(&'a str, &'a str)>,
}

/// The properties of the earlier binary form ([`BINARY_HEADER`]), read only (written by tests).
#[derive(Serialize, Deserialize)]
struct TextHeader<'a> {
    #[serde(borrow)]
    system: Vec<(StoredName<'a>, &'a str)>,
    #[serde(borrow)]
    application: Vec<(&'a str, &'a str)>,
}

/// Azure's `MessageTooLarge` for a body over the limit.
fn check_body_size(len: usize, max_bytes: usize) -> HubResult<()> {
    if len > max_bytes {
        return Err(HubError::new(
            meridian_proto::ErrorCode::MessageTooLarge,
            format!("telemetry body is {len} bytes; the limit is {max_bytes}"),
        ));
    }
    Ok(())
}

/// [`COMPACT_HEADER`], the postcard header, the body (None: postcard refused the header).
fn encode_stored(header: &StoredHeader<'_>, body: &[u8]) -> Option<Vec<u8>> {
    // Sized up front: growing past a guess copied the body again, ~1% of a node's CPU under load.
    let mut out = Vec::with_capacity(stored_len_bound(header, body));
    out.push(COMPACT_HEADER);
    let mut out = postcard::to_extend(header, out).ok()?;
    out.extend_from_slice(body);
    Some(out)
}

/// At least the length of [`encode_stored`]'s output: postcard writes a string as a varint length
/// (3 bytes below 2 MiB) and its bytes, a well-known name or value as a variant tag and a code.
fn stored_len_bound(header: &StoredHeader<'_>, body: &[u8]) -> usize {
    let system: usize = header
        .system
        .iter()
        .map(|(k, v)| match k {
            StoredName::Known(_) => 2 + v.len_bound(),
            StoredName::Other(k) => 1 + k.len() + 3 + v.len_bound(),
        })
        .sum();
    let application: usize = header
        .application
        .iter()
        .map(|(k, v)| k.len() + v.len() + 6)
        .sum();
    // The header byte and the two sequences' varint lengths.
    1 + 3 + system + 3 + application + body.len()
}

/// A property map's view of pairs inserted in this order: sorted by name, a later pair
/// replacing an earlier one of the same name (as `BTreeMap::insert` does).
fn by_name_last_wins<'a>(mut pairs: Vec<(&'a str, &'a str)>) -> Vec<(&'a str, &'a str)> {
    // Stable: pairs of one name keep their insertion order, so the last of each run wins.
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let mut out: Vec<(&str, &str)> = Vec::with_capacity(pairs.len());
    for pair in pairs {
        if out.last().is_some_and(|last| last.0 == pair.0) {
            out.pop();
        }
        out.push(pair);
    }
    out
}

/// The partition of a device: a stable hash (FNV-1a, 64 bit) of the device id modulo the count,
/// so a device's messages stay in one partition, in order.
pub fn partition_for(device_id: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device_id.as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> Sender {
        Sender {
            device_id: "dev1".into(),
            module_id: None,
            generation_id: "636510460778278550".into(),
            auth_type: "sasToken",
        }
    }

    #[test]
    fn the_direct_encoding_is_the_messages_encoding() {
        let module = Sender {
            module_id: Some("m1".into()),
            auth_type: "x509Certificate",
            ..sender()
        };
        let bags = [
            "",
            "%24.mid=e2e-x-0&%24.cid=corr-x&%24.ct=application%2Fjson&%24.ce=utf-8&e2e=x&needs%20encoding=a%2Fb%26c%3Dd%20%C3%BC&seq=0",
            // Repeated names (the last wins), spoofing attempts, a bare key, unknown `$` keys.
            "b=1&a=2&b=3&%24.mid=1&%24.mid=2&iothub-connection-device-id=other&%24.iothub-enqueuedtime=x&bare&%24.zzz=1",
            "x-opt-retain=0&%24.on=out&%24.ifid=urn%3Ax&%24.exp=2030&%24.uid=u",
        ];
        for bag in bags {
            for (who, retain) in [(sender(), false), (module.clone(), true)] {
                let body = b"{\"t\":1}";
                let direct = TelemetryMessage::encode_from_device(
                    bag,
                    body,
                    &who,
                    "2026-11-28T00:00:00.000Z",
                    retain,
                    MAX_TELEMETRY_BYTES,
                )
                .expect("valid");
                let built = TelemetryMessage::from_device(
                    bag,
                    body.to_vec(),
                    &who,
                    "2026-11-28T00:00:00.000Z",
                    retain,
                    MAX_TELEMETRY_BYTES,
                )
                .expect("valid");
                assert_eq!(direct, built.encode(), "bag {bag:?}, retain {retain}");
                // Sized once, with little to spare (a stored record stays in memory a while).
                let header = built.stored_header();
                let bound = stored_len_bound(&header, body);
                let pairs = header.system.len() + header.application.len();
                assert!(
                    (direct.len()..=direct.len() + 6 * pairs).contains(&bound),
                    "bound {bound} for {} bytes",
                    direct.len()
                );
                assert_eq!(TelemetryMessage::decode(&direct), Some(built));
            }
        }
        let too_big = TelemetryMessage::encode_from_device("", &[0; 11], &sender(), "t", false, 10);
        assert!(too_big.is_err_and(|e| e.code == meridian_proto::ErrorCode::MessageTooLarge));
        let bad_bag = TelemetryMessage::encode_from_device("%FF=1", b"", &sender(), "t", false, 10);
        assert!(bad_bag.is_err());
    }

    #[test]
    fn python_sdk_property_bag() {
        let bag = "%24.mid=e2e-x-0&%24.cid=corr-x&%24.ct=application%2Fjson&%24.ce=utf-8&e2e=x&needs%20encoding=a%2Fb%26c%3Dd%20%C3%BC&seq=0";
        let m = TelemetryMessage::from_device(
            bag,
            b"{}".to_vec(),
            &sender(),
            "t",
            false,
            MAX_TELEMETRY_BYTES,
        )
        .expect("valid");
        assert_eq!(m.system_properties["message-id"], "e2e-x-0");
        assert_eq!(m.system_properties["content-type"], "application/json");
        assert_eq!(m.system_properties["content-encoding"], "utf-8");
        assert_eq!(m.application_properties["needs encoding"], "a/b&c=d ü");
        assert_eq!(m.application_properties["seq"], "0");
        assert_eq!(m.system_properties["iothub-connection-device-id"], "dev1");
    }

    #[test]
    fn devices_cannot_spoof_hub_properties() {
        let bag = "%24.iothub-connection-device-id=other&iothub-connection-device-id=other";
        let m = TelemetryMessage::from_device(
            bag,
            Vec::new(),
            &sender(),
            "t",
            true,
            MAX_TELEMETRY_BYTES,
        )
        .expect("valid");
        assert_eq!(m.system_properties["iothub-connection-device-id"], "dev1");
        // an application property of that name stays an application property
        assert_eq!(
            m.application_properties["iothub-connection-device-id"],
            "other"
        );
        assert_eq!(m.application_properties["x-opt-retain"], "1");
    }

    #[test]
    fn oversize_is_rejected_and_encoding_round_trips() {
        let big = vec![0u8; MAX_TELEMETRY_BYTES + 1];
        assert!(
            TelemetryMessage::from_device("", big, &sender(), "t", false, MAX_TELEMETRY_BYTES)
                .is_err()
        );
        let m = TelemetryMessage::from_device(
            "a=1",
            vec![1, 2, 3],
            &sender(),
            "t",
            false,
            MAX_TELEMETRY_BYTES,
        )
        .expect("valid");
        assert_eq!(TelemetryMessage::decode(&m.encode()), Some(m.clone()));
        assert_eq!(TelemetryMessage::decode(&[0, 0]), None);
        // Records stored in the first (JSON) form stay readable.
        assert_eq!(TelemetryMessage::decode(&m.encode_json()), Some(m.clone()));
        assert!(
            m.encode().len() < m.encode_json().len(),
            "the binary form is the smaller one"
        );
        // Names outside the table, empty maps and empty bodies round-trip too.
        let mut other = m.clone();
        other
            .system_properties
            .insert("x-not-in-the-table".into(), "v".into());
        other.application_properties.clear();
        other.body.clear();
        assert_eq!(TelemetryMessage::decode(&other.encode()), Some(other));
        // A code past the table, truncated or garbage headers: None, never a panic.
        assert_eq!(
            TelemetryMessage::decode(&[BINARY_HEADER, 1, 0, 200, 0, 0]),
            None
        );
        let encoded = m.encode();
        for cut in 1..encoded.len().min(40) {
            let _ = TelemetryMessage::decode(&encoded[..cut]);
        }
        assert_eq!(TelemetryMessage::decode(&[BINARY_HEADER]), None);
        assert_eq!(TelemetryMessage::decode(&[COMPACT_HEADER]), None);
        // A value code past the table is None too.
        assert_eq!(
            TelemetryMessage::decode(&[COMPACT_HEADER, 1, 0, 3, 1, 200, 0]),
            None
        );
    }

    /// The earlier binary form, as sessions before ADR 017 wrote it.
    fn encode_text_form(m: &TelemetryMessage) -> Vec<u8> {
        let header = TextHeader {
            system: m
                .system_properties
                .iter()
                .map(|(k, v)| (StoredName::of(k), v.as_str()))
                .collect(),
            application: m
                .application_properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        };
        let mut out = postcard::to_extend(&header, vec![BINARY_HEADER]).expect("encodes");
        out.extend_from_slice(&m.body);
        out
    }

    #[test]
    fn stamped_values_are_stored_as_codes_and_records_of_every_form_read_back() {
        let stamped = |who: &Sender| {
            TelemetryMessage::from_device(
                "%24.mid=42&%24.cid=0042&a=2026-11-28T00:00:00.000Z",
                vec![7; 256],
                who,
                "2026-11-28T20:41:07.123Z",
                false,
                MAX_TELEMETRY_BYTES,
            )
            .expect("valid")
        };
        for auth_type in ["sasToken", "x509Certificate"] {
            for module_id in [None, Some("m1".to_string())] {
                let who = Sender {
                    module_id,
                    auth_type,
                    ..sender()
                };
                // Every auth method the hub stamps is a code, or records silently grow again;
                // the codes spell what Azure stamps.
                let method = who.auth_method();
                assert!(STORED_VALUES.contains(&method.as_ref()));
                let scope = if who.module_id.is_some() {
                    "module"
                } else {
                    "device"
                };
                assert_eq!(
                    method,
                    format!(r#"{{"scope":"{scope}","type":"{auth_type}","issuer":"iothub"}}"#)
                );
                let m = stamped(&who);
                let compact = m.encode();
                let text = encode_text_form(&m);
                assert_eq!(compact[0], COMPACT_HEADER);
                assert_eq!(TelemetryMessage::decode(&compact), Some(m.clone()));
                assert_eq!(TelemetryMessage::decode(&text), Some(m.clone()));
                // Auth method, enqueued time, generation id, source and the numeric message id.
                assert!(
                    compact.len() + 80 < text.len(),
                    "compact {} bytes, text {}",
                    compact.len(),
                    text.len()
                );
            }
        }
    }

    #[test]
    fn compact_values_read_back_as_exactly_the_same_text() {
        for text in ["0", "7", "42", "636510460778278550", "18446744073709551615"] {
            assert_eq!(
                parse_canonical_number(text).map(|n| n.to_string()),
                Some(text.into())
            );
        }
        for text in [
            "",
            "007",
            "-1",
            "+1",
            "1.0",
            " 1",
            "18446744073709551616",
            "1e3",
        ] {
            assert_eq!(parse_canonical_number(text), None, "{text:?}");
        }
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // Every time the hub formats parses back to its millisecond, up to the year 9999.
        for _ in 0..20_000 {
            let ms = next() % 253_402_300_800_000;
            let text = format_millis(ms).expect("in range");
            assert_eq!(parse_millis(&text), Some(ms), "{text}");
        }
        for edge in [0, 951_782_400_000, 4_107_456_000_000, 253_402_300_799_999] {
            let text = format_millis(edge).expect("in range");
            assert_eq!(parse_millis(&text), Some(edge), "{text}");
        }
        // Whatever else parses formats back to the same text: mutate valid times a character
        // at a time (days past the month's end, hour 24, leap seconds, other letters).
        let alphabet = b"0123456789-:.TZtz+ ";
        let mut accepted = 0;
        for _ in 0..50_000 {
            let ms = next() % 4_102_444_800_000;
            let mut bytes = format_millis(ms).expect("in range").into_bytes();
            let at = (next() % 24) as usize;
            bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize];
            let text = String::from_utf8(bytes).expect("ascii");
            if let Some(parsed) = parse_millis(&text) {
                accepted += 1;
                assert_eq!(format_millis(parsed).as_deref(), Some(text.as_str()));
            }
        }
        assert!(
            accepted > 10_000,
            "mutations of digits stay valid often: {accepted}"
        );
        for text in [
            "2026-02-29T00:00:00.000Z",
            "2024-02-30T00:00:00.000Z",
            "2026-04-31T00:00:00.000Z",
            "2026-11-28T24:00:00.000Z",
            "2026-11-28T23:59:60.000Z",
            "2026-13-01T00:00:00.000Z",
            "2026-00-01T00:00:00.000Z",
            "1969-12-31T23:59:59.999Z",
            "2026-11-28T20:41:07.123z",
            "2026-11-28T20:41:07.1234Z",
            "2026-11-28T20:41:07.12Z",
            "2026-11-28T20:41:07+00:00",
            "2026-11-28 20:41:07.123Z",
        ] {
            assert_eq!(parse_millis(text), None, "{text}");
        }
        assert_eq!(
            parse_millis("2024-02-29T00:00:00.000Z"),
            Some(1_709_164_800_000)
        );
        for n in [0, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let encoded = postcard::to_stdvec(&StoredValue::Number(n)).expect("encodes");
            assert_eq!(encoded.len(), 1 + varint_len(n), "{n}");
        }
    }

    #[test]
    fn bags_round_trip_with_everything_escaped() {
        let bag = encode_property_bag([("$.mid", "m/1"), ("k&=", "v %/")]);
        assert!(!bag[..].contains('/'));
        let parsed = parse_property_bag(&bag).expect("valid");
        assert_eq!(
            parsed,
            vec![
                ("$.mid".into(), "m/1".into()),
                ("k&=".into(), "v %/".into())
            ]
        );
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_for("dev1", 4), partition_for("dev1", 4));
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..100 {
            let p = partition_for(&format!("d{i}"), 4);
            assert!(p < 4);
            seen.insert(p);
        }
        assert_eq!(seen.len(), 4);
    }
}
