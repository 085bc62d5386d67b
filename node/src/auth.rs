//! Shared access signature (SAS) tokens: parsing, signing and verification.
//!
//! Token form: `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64}&se={unix
//! expiry}[&skn={policy}]`, fields in any order. The signature is HMAC-SHA256 with the base64-decoded
//! key over `sr` exactly as sent (still URL-encoded) + `"\n"` + `se` — the one rule that matches every
//! official SDK (see `shared/spec/sdk-wire.md` §1.8). Scope is a path-segment prefix: a token for
//! `host/devices/d1` covers `devices/d1/...` but not `devices/d10`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::domain::{HubError, HubResult, Permission, SharedAccessPolicy};
use meridian_proto::ErrorCode;

const PREFIX: &str = "SharedAccessSignature ";

/// A parsed SAS token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` as sent (URL-encoded); the signature covers exactly this text.
    pub resource_raw: String,
    /// `sr` decoded and lower-cased, for scope checks.
    pub resource: String,
    /// Decoded signature bytes.
    pub signature: Vec<u8>,
    /// Expiry, seconds since the Unix epoch.
    pub expiry: u64,
    /// Policy name; absent for device-key tokens.
    pub key_name: Option<String>,
}

/// Key name of the operator credential that the control-plane API requires.
pub const OPERATOR_KEY_NAME: &str = "meridian-operator";

/// Checks an operator token (`SharedAccessKeyName=meridian-operator`, signed with the hub's
/// operator key, not expired). Hub policies are refused: managing the cluster is not a hub right.
pub fn authorize_operator(
    authorization: Option<&str>,
    operator_key: &str,
    now: u64,
) -> HubResult<()> {
    let token =
        SasToken::parse(authorization.ok_or_else(|| unauthorized("missing Authorization"))?)?;
    if token.key_name.as_deref() != Some(OPERATOR_KEY_NAME) {
        return Err(unauthorized(format!(
            "the control-plane API needs the {OPERATOR_KEY_NAME} credential"
        )));
    }
    if operator_key.is_empty() || !token.signed_by(operator_key) {
        return Err(unauthorized("operator signature does not match"));
    }
    token.check_expiry(now)
}

fn unauthorized(message: impl Into<String>) -> HubError {
    HubError::new(ErrorCode::IotHubUnauthorizedAccess, message)
}

impl SasToken {
    /// Parses an `Authorization` header value or MQTT password.
    pub fn parse(text: &str) -> HubResult<Self> {
        let body = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| unauthorized("credentials are not a SharedAccessSignature"))?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in body.split('&') {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| unauthorized("malformed SharedAccessSignature field"))?;
            match key {
                "sr" => sr = Some(value.to_string()),
                "sig" => sig = Some(value.to_string()),
                "se" => se = Some(value.to_string()),
                "skn" => skn = Some(value.to_string()),
                _ => {}
            }
        }
        let resource_raw = sr.ok_or_else(|| unauthorized("SharedAccessSignature lacks sr"))?;
        let sig = sig.ok_or_else(|| unauthorized("SharedAccessSignature lacks sig"))?;
        let se = se.ok_or_else(|| unauthorized("SharedAccessSignature lacks se"))?;
        let resource = percent_decode_str(&resource_raw)
            .decode_utf8()
            .map_err(|_| unauthorized("sr is not UTF-8"))?
            .to_lowercase();
        let sig_decoded = percent_decode_str(&sig).decode_utf8_lossy().into_owned();
        let signature = B64
            .decode(sig_decoded.as_bytes())
            .map_err(|_| unauthorized("sig is not base64"))?;
        let expiry = se
            .parse::<u64>()
            .map_err(|_| unauthorized("se is not a number"))?;
        let key_name = skn
            .map(|s| percent_decode_str(&s).decode_utf8_lossy().into_owned())
            .filter(|s| !s.is_empty());
        Ok(Self {
            resource_raw,
            resource,
            signature,
            expiry,
            key_name,
        })
    }

    /// Whether the token is signed by `key_b64` (constant-time comparison).
    pub fn signed_by(&self, key_b64: &str) -> bool {
        let Ok(key) = B64.decode(key_b64) else {
            return false;
        };
        let expected = signature(&key, &self.resource_raw, self.expiry);
        expected.ct_eq(&self.signature).into()
    }

    /// Whether the token is signed the Service Bus way: HMAC keyed with the key's text itself
    /// (not base64-decoded), as the Event Hubs SDKs sign for the Event Hub-compatible endpoint.
    pub fn signed_by_key_text(&self, key_text: &str) -> bool {
        let expected = signature(key_text.as_bytes(), &self.resource_raw, self.expiry);
        expected.ct_eq(&self.signature).into()
    }

    /// The path segments of the token's scope, after the host.
    pub fn scope_segments(&self) -> Vec<&str> {
        // `sr` is `host[/path]`; a trailing query-like suffix seen in old samples is ignored.
        let path = self.resource.split('?').next().unwrap_or("");
        path.split('/').skip(1).filter(|s| !s.is_empty()).collect()
    }

    /// Whether the token's scope covers a resource path (segment prefix, case-insensitive).
    pub fn covers(&self, resource: &[&str]) -> bool {
        let scope = self.scope_segments();
        scope.len() <= resource.len()
            && scope
                .iter()
                .zip(resource)
                .all(|(s, r)| s.eq_ignore_ascii_case(r) || (*s == "module" && *r == "modules"))
    }

    /// Fails when the token is expired at `now` (Unix seconds).
    pub fn check_expiry(&self, now: u64) -> HubResult<()> {
        if self.expiry <= now {
            return Err(unauthorized("the SharedAccessSignature has expired"));
        }
        Ok(())
    }
}

fn signature(key: &[u8], resource_raw: &str, expiry: u64) -> Vec<u8> {
    // HMAC accepts keys of any length, so new_from_slice cannot fail here.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Vec::new();
    };
    mac.update(resource_raw.as_bytes());
    mac.update(b"\n");
    mac.update(expiry.to_string().as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Builds a token for `resource` (unencoded, e.g. `host/devices/d1`) signed with `key_b64`.
pub fn sign(
    resource: &str,
    key_b64: &str,
    expiry: u64,
    key_name: Option<&str>,
) -> HubResult<String> {
    let key = B64
        .decode(key_b64)
        .map_err(|_| HubError::invalid("key is not base64"))?;
    let sr = utf8_percent_encode(resource, NON_ALPHANUMERIC).to_string();
    let sig = B64.encode(signature(&key, &sr, expiry));
    let sig = utf8_percent_encode(&sig, NON_ALPHANUMERIC).to_string();
    let mut token = format!("{PREFIX}sr={sr}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(name);
    }
    Ok(token)
}

/// Authenticates a service request: the token must name a hub policy (`skn`), be signed with one
/// of its keys, be unexpired, cover `resource`, and the policy must grant one of `needed`.
pub fn authorize_service<'a>(
    header: Option<&str>,
    policies: impl Fn(&str) -> Option<&'a SharedAccessPolicy>,
    needed: &[Permission],
    resource: &[&str],
    now: u64,
) -> HubResult<&'a SharedAccessPolicy> {
    let header = header.ok_or_else(|| unauthorized("the request has no Authorization header"))?;
    let token = SasToken::parse(header)?;
    token.check_expiry(now)?;
    let name = token.key_name.as_deref().ok_or_else(|| {
        unauthorized("service requests need a token signed with a shared access policy (skn)")
    })?;
    let policy = policies(name).ok_or_else(|| unauthorized(format!("unknown policy {name}")))?;
    if !(token.signed_by(&policy.primary_key) || token.signed_by(&policy.secondary_key)) {
        return Err(unauthorized(
            "the SharedAccessSignature does not match the policy's keys",
        ));
    }
    if !token.covers(resource) {
        return Err(unauthorized(
            "the token's scope (sr) does not cover this resource",
        ));
    }
    if !needed.iter().any(|p| policy.grants(*p)) {
        return Err(HubError::new(
            ErrorCode::Unauthorized,
            format!("policy {name} lacks the permission for this operation (one of {needed:?})"),
        ));
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        B64.encode([7u8; 32])
    }

    fn policy(rights: Vec<Permission>) -> SharedAccessPolicy {
        SharedAccessPolicy {
            key_name: "p".into(),
            primary_key: key(),
            secondary_key: B64.encode([9u8; 32]),
            rights,
        }
    }

    #[test]
    fn python_service_sdk_token_verifies() {
        // The service SDK signs quote_plus(HostName): "localhost%3A8443".
        let sr = "localhost%3A8443";
        let sig = B64.encode(signature(&[7u8; 32], sr, 2_000_000_000));
        let sig = utf8_percent_encode(&sig, percent_encoding::CONTROLS).to_string();
        let header = format!("SharedAccessSignature sr={sr}&sig={sig}&se=2000000000&skn=p");
        let p = policy(vec![Permission::RegistryRead]);
        let ok = authorize_service(
            Some(&header),
            |_| Some(&p),
            &[Permission::RegistryRead],
            &["devices", "d1"],
            1,
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn rejects_missing_expired_wrong_key_and_underprivileged() {
        let p = policy(vec![Permission::RegistryRead]);
        let lookup = |_: &str| Some(&p);
        let code = |r: HubResult<&SharedAccessPolicy>| r.map(|_| ()).map_err(|e| e.code);
        assert_eq!(
            code(authorize_service(
                None,
                lookup,
                &[Permission::RegistryRead],
                &[],
                1
            )),
            Err(ErrorCode::IotHubUnauthorizedAccess)
        );
        let expired = sign("h", &key(), 100, Some("p")).expect("sign");
        assert_eq!(
            code(authorize_service(
                Some(&expired),
                lookup,
                &[Permission::RegistryRead],
                &[],
                200
            )),
            Err(ErrorCode::IotHubUnauthorizedAccess)
        );
        let wrong = sign("h", &B64.encode([1u8; 32]), 300, Some("p")).expect("sign");
        assert_eq!(
            code(authorize_service(
                Some(&wrong),
                lookup,
                &[Permission::RegistryRead],
                &[],
                200
            )),
            Err(ErrorCode::IotHubUnauthorizedAccess)
        );
        let good = sign("h", &key(), 300, Some("p")).expect("sign");
        assert_eq!(
            code(authorize_service(
                Some(&good),
                lookup,
                &[Permission::RegistryWrite],
                &[],
                200
            )),
            Err(ErrorCode::Unauthorized)
        );
        let secondary = sign("h", &B64.encode([9u8; 32]), 300, Some("p")).expect("sign");
        assert_eq!(
            code(authorize_service(
                Some(&secondary),
                lookup,
                &[Permission::RegistryRead],
                &[],
                200
            )),
            Ok(())
        );
        let device_token = sign("h/devices/d1", &key(), 300, None).expect("sign");
        assert_eq!(
            code(authorize_service(
                Some(&device_token),
                lookup,
                &[Permission::RegistryRead],
                &[],
                200
            )),
            Err(ErrorCode::IotHubUnauthorizedAccess)
        );
    }

    #[test]
    fn scope_is_a_segment_prefix() {
        let t = SasToken::parse(&sign("Hub.example/devices/d1", &key(), 9, None).expect("sign"))
            .expect("parse");
        assert!(t.covers(&["devices", "d1"]));
        assert!(t.covers(&["devices", "d1", "modules", "m"]));
        assert!(!t.covers(&["devices", "d10"]));
        assert!(!t.covers(&["devices"]));
        let root =
            SasToken::parse(&sign("hub.example", &key(), 9, None).expect("sign")).expect("parse");
        assert!(root.covers(&["devices", "anything"]));
    }

    #[test]
    fn device_sdk_escaped_slash_in_sig() {
        // The device SDK escapes '/' in sig as %2F; the signature must still verify.
        let sr = "127.0.0.1%2Fdevices%2Fprobe1";
        let raw = B64.encode(signature(&[7u8; 32], sr, 1_795_774_756));
        let escaped = raw
            .replace('/', "%2F")
            .replace('+', "%2B")
            .replace('=', "%3D");
        let t = SasToken::parse(&format!(
            "SharedAccessSignature sr={sr}&sig={escaped}&se=1795774756"
        ))
        .expect("parse");
        assert!(t.signed_by(&key()));
        assert_eq!(t.resource, "127.0.0.1/devices/probe1");
    }
}

/// A device's credential at connect time.
#[derive(Debug, Clone, Copy)]
pub enum DeviceCredential<'a> {
    /// The MQTT password: a SAS token.
    Sas(&'a str),
    /// The TLS client certificate chain, leaf first, DER (no password).
    ClientCertificate(&'a [Vec<u8>]),
}

/// A successfully authenticated device connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    /// The identity's generation id (stamped on telemetry).
    pub generation_id: String,
    /// `sasToken` or `x509Certificate`.
    pub auth_type: &'static str,
    /// When the credential stops being valid (Unix seconds); the connection is closed then.
    pub expires_at: Option<u64>,
}

/// Hex SHA-1 and SHA-256 thumbprints of a DER certificate, upper-case.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    use sha1::Digest as _;
    let s1 = hex::encode_upper(sha1::Sha1::digest(der));
    let s256 = hex::encode_upper(sha2::Sha256::digest(der));
    (s1, s256)
}

/// Authenticates a device or module connection against the registry: the identity must exist and
/// be enabled, and the credential must be a valid, unexpired SAS token scoped to it (signed with
/// its own key, or with a hub policy granting DeviceConnect) or a client certificate whose
/// thumbprint is registered for it.
pub fn authenticate_device(
    state: &crate::domain::HubState,
    device_id: &str,
    module_id: Option<&str>,
    credential: DeviceCredential<'_>,
    now: u64,
) -> HubResult<DeviceAuth> {
    use crate::domain::registry::{AuthenticationType, DeviceStatus};
    use crate::domain::{DeviceId, ModuleId};
    let id = DeviceId::new(device_id)?;
    let entry = state
        .devices
        .get(&id)
        .ok_or_else(|| HubError::device_not_found(device_id))?;
    if entry.device.status == DeviceStatus::Disabled {
        return Err(unauthorized(format!("device {device_id} is disabled")));
    }
    let identity = match module_id {
        None => &entry.device.identity,
        Some(m) => {
            let mid = ModuleId::new(m)?;
            &entry
                .modules
                .get(&mid)
                .ok_or_else(|| HubError::module_not_found(device_id, m))?
                .module
                .identity
        }
    };
    let mut resource = vec!["devices", device_id];
    if let Some(m) = module_id {
        resource.extend(["modules", m]);
    }
    match credential {
        DeviceCredential::Sas(text) => {
            let token = SasToken::parse(text)?;
            token.check_expiry(now)?;
            if !token.covers(&resource) {
                return Err(unauthorized("the token's scope does not cover this device"));
            }
            let signed = match &token.key_name {
                Some(name) => {
                    let policy = state
                        .policy(name)
                        .ok_or_else(|| unauthorized(format!("unknown policy {name}")))?;
                    if !policy.grants(Permission::DeviceConnect) {
                        return Err(unauthorized(format!("policy {name} lacks DeviceConnect")));
                    }
                    token.signed_by(&policy.primary_key) || token.signed_by(&policy.secondary_key)
                }
                None => {
                    let keys = &identity.authentication.symmetric_key;
                    identity.authentication.kind == AuthenticationType::Sas
                        && [&keys.primary_key, &keys.secondary_key]
                            .into_iter()
                            .flatten()
                            .any(|k| token.signed_by(k))
                }
            };
            if !signed {
                return Err(unauthorized("the SharedAccessSignature does not match"));
            }
            Ok(DeviceAuth {
                generation_id: identity.generation_id.clone(),
                auth_type: "sasToken",
                expires_at: Some(token.expiry),
            })
        }
        DeviceCredential::ClientCertificate(chain) => {
            let auth = &identity.authentication;
            let Some(der) = chain.first() else {
                return Err(unauthorized("no client certificate"));
            };
            if auth.kind == AuthenticationType::CertificateAuthority {
                let expected_cn = module_id.unwrap_or(device_id);
                verify_ca_chain(state, chain, expected_cn, now)?;
                return Ok(DeviceAuth {
                    generation_id: identity.generation_id.clone(),
                    auth_type: "x509Certificate",
                    expires_at: None,
                });
            }
            if auth.kind != AuthenticationType::SelfSigned {
                return Err(unauthorized(
                    "this identity does not authenticate with an X.509 certificate",
                ));
            }
            let (s1, s256) = thumbprints(der);
            let registered = [
                &auth.x509_thumbprint.primary_thumbprint,
                &auth.x509_thumbprint.secondary_thumbprint,
            ];
            let ok = registered
                .into_iter()
                .flatten()
                .any(|t| t.eq_ignore_ascii_case(&s1) || t.eq_ignore_ascii_case(&s256));
            if !ok {
                return Err(unauthorized(
                    "the client certificate's thumbprint is not registered",
                ));
            }
            Ok(DeviceAuth {
                generation_id: identity.generation_id.clone(),
                auth_type: "x509Certificate",
                expires_at: None,
            })
        }
    }
}

/// Reads the single certificate of a PEM text as DER.
pub fn pem_certificate(pem: &str) -> HubResult<Vec<u8>> {
    let mut certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HubError::invalid(format!("certificate PEM: {e}")))?;
    if certs.len() != 1 {
        return Err(HubError::invalid(
            "the PEM must hold exactly one certificate",
        ));
    }
    if pem.contains("PRIVATE KEY") {
        return Err(HubError::invalid("the PEM must not contain a private key"));
    }
    Ok(certs.remove(0).as_ref().to_vec())
}

/// Verifies a client chain against the hub's verified CA certificates (client-auth usage, validity
/// at `now`) and that the leaf's subject CN is the device (or module) id, as Azure requires.
fn verify_ca_chain(
    state: &crate::domain::HubState,
    chain: &[Vec<u8>],
    expected_cn: &str,
    now: u64,
) -> HubResult<()> {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let anchor_ders: Vec<Vec<u8>> = state
        .certificates
        .values()
        .filter(|c| c.is_verified)
        .filter_map(|c| pem_certificate(&c.certificate).ok())
        .collect();
    let anchor_certs: Vec<CertificateDer<'_>> = anchor_ders
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors: Vec<_> = anchor_certs
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    if anchors.is_empty() {
        return Err(unauthorized("no verified CA certificate is registered"));
    }
    let leaf = CertificateDer::from(chain[0].as_slice());
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let end_entity = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| unauthorized(format!("client certificate: {e}")))?;
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| unauthorized(format!("client certificate chain: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| unauthorized(format!("client certificate: {e}")))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok());
    if cn != Some(expected_cn) {
        return Err(unauthorized(format!(
            "the client certificate's subject CN {cn:?} is not {expected_cn}"
        )));
    }
    Ok(())
}
