//! Claims-based security: the tokens an AMQP connection has put (`$cbs` put-token, or SASL PLAIN)
//! and what they allow. Pure: the caller supplies the policies and the clock.
//!
//! A token is a hub SAS signed with a shared access policy (`skn`), verified exactly like the REST
//! API's (`crate::auth`). Its scope is `sr` without scheme and host; a link is allowed while an
//! unexpired token whose scope covers the link's resource names a policy with the right.

use percent_encoding::percent_decode_str;

use super::address::path_segments;
use crate::auth::SasToken;
use crate::domain::{HubError, HubResult, Permission, SharedAccessPolicy};
use meridian_proto::ErrorCode;

/// One accepted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The audience it was put for (as sent); a new token for the same audience replaces it.
    pub audience: String,
    /// `sr`'s path segments after the host, lower-cased.
    pub scope: Vec<String>,
    /// The policy's rights.
    pub rights: Vec<Permission>,
    /// Expiry (Unix seconds).
    pub expiry: u64,
    /// The token itself: a device connection authenticates its identity with it.
    pub token: String,
}

impl Grant {
    fn covers(&self, resource: &[String]) -> bool {
        self.scope.len() <= resource.len()
            && self
                .scope
                .iter()
                .zip(resource)
                .all(|(s, r)| s.eq_ignore_ascii_case(r))
    }
}

/// The grants of one connection.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    grants: Vec<Grant>,
}

impl Grants {
    /// Adds `grant`, replacing an earlier one for the same audience (a token refresh).
    pub fn put(&mut self, grant: Grant) {
        self.grants.retain(|g| g.audience != grant.audience);
        self.grants.push(grant);
    }

    /// The token of a live grant covering `resource` with `needed`.
    pub fn token_for(&self, resource: &[String], needed: Permission, now: u64) -> Option<String> {
        self.grants
            .iter()
            .filter(|g| g.expiry > now && g.covers(resource) && g.rights.contains(&needed))
            .max_by_key(|g| g.expiry)
            .map(|g| g.token.clone())
    }

    /// Why `resource` may not be used with `needed` at `now`, or `Ok` when it may.
    pub fn check(&self, resource: &[String], needed: Permission, now: u64) -> HubResult<()> {
        let covering: Vec<&Grant> = self.grants.iter().filter(|g| g.covers(resource)).collect();
        if covering.is_empty() {
            return Err(HubError::new(
                ErrorCode::IotHubUnauthorizedAccess,
                format!(
                    "no token covers /{}: put one on $cbs first",
                    resource.join("/")
                ),
            ));
        }
        let live: Vec<&&Grant> = covering.iter().filter(|g| g.expiry > now).collect();
        if live.is_empty() {
            return Err(HubError::new(
                ErrorCode::IotHubUnauthorizedAccess,
                "the token for this link has expired",
            ));
        }
        if !live.iter().any(|g| g.rights.contains(&needed)) {
            return Err(HubError::new(
                ErrorCode::Unauthorized,
                format!("the token's policy lacks {needed:?}"),
            ));
        }
        Ok(())
    }
}

/// The path segments of `sr` or an audience: scheme, host and URL-encoding removed, lower-cased.
fn scope_of(text: &str) -> Vec<String> {
    let decoded = percent_decode_str(text).decode_utf8_lossy().to_lowercase();
    let segments: Vec<String> = if decoded.contains("://") {
        path_segments(&decoded)
            .into_iter()
            .map(str::to_string)
            .collect()
    } else {
        // `host[/path]`: the first segment is the host.
        decoded
            .split('/')
            .filter(|s| !s.is_empty())
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    segments
}

/// A device-key token (no `skn`): its scope `host/devices/{id}[/modules/{m}]`, or `None` when
/// the token names a policy (or is no SAS at all).
pub fn device_scope(token: &str) -> Option<Vec<String>> {
    let parsed = SasToken::parse(token).ok()?;
    if parsed.key_name.is_some() {
        return None;
    }
    let scope = scope_of(&parsed.resource_raw);
    match scope.as_slice() {
        [d, _] | [d, _, _, _] if d == "devices" => Some(scope),
        _ => None,
    }
}

/// The grant of a device-key token whose identity `authenticate` accepted.
pub fn device_grant(token: &str, audience: &str, scope: Vec<String>) -> HubResult<Grant> {
    let parsed = SasToken::parse(token)?;
    Ok(Grant {
        audience: audience.to_string(),
        scope,
        rights: vec![Permission::DeviceConnect],
        expiry: parsed.expiry,
        token: token.to_string(),
    })
}

/// Verifies a put-token (or SASL PLAIN password) `token` for `audience` at `now`.
pub fn verify_token<'a>(
    token: &str,
    audience: &str,
    policy: impl Fn(&str) -> Option<&'a SharedAccessPolicy>,
    now: u64,
) -> HubResult<Grant> {
    let parsed = SasToken::parse(token)?;
    parsed.check_expiry(now)?;
    let name = parsed.key_name.as_deref().ok_or_else(|| {
        HubError::new(
            ErrorCode::IotHubUnauthorizedAccess,
            "service links need a token signed with a shared access policy (skn)",
        )
    })?;
    let policy = policy(name).ok_or_else(|| {
        HubError::new(
            ErrorCode::IotHubUnauthorizedAccess,
            format!("unknown policy {name}"),
        )
    })?;
    // IoT Hub SDKs key the HMAC with the decoded key; Event Hubs SDKs (on the Event
    // Hub-compatible endpoint) with the key's text, as Service Bus does. Azure accepts both here.
    let signed = [&policy.primary_key, &policy.secondary_key]
        .iter()
        .any(|k| parsed.signed_by(k) || parsed.signed_by_key_text(k));
    if !signed {
        return Err(HubError::new(
            ErrorCode::IotHubUnauthorizedAccess,
            "the SharedAccessSignature does not match the policy's keys",
        ));
    }
    let grant = Grant {
        audience: audience.to_string(),
        scope: scope_of(&parsed.resource_raw),
        rights: policy.rights.clone(),
        expiry: parsed.expiry,
        token: token.to_string(),
    };
    // The token must cover what it is put for (a token for one consumer group is no token for
    // another's audience).
    if !audience.is_empty() && !grant.covers(&scope_of(audience)) {
        return Err(HubError::new(
            ErrorCode::IotHubUnauthorizedAccess,
            format!("the token's scope (sr) does not cover the audience {audience}"),
        ));
    }
    Ok(grant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn policy() -> SharedAccessPolicy {
        SharedAccessPolicy {
            key_name: "service".into(),
            primary_key: base64::engine::general_purpose::STANDARD.encode([3u8; 32]),
            secondary_key: base64::engine::general_purpose::STANDARD.encode([4u8; 32]),
            rights: vec![Permission::ServiceConnect],
        }
    }

    fn token(sr: &str, expiry: u64) -> String {
        crate::auth::sign(sr, &policy().primary_key, expiry, Some("service")).expect("sign")
    }

    fn segments(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tokens_of_every_sdk_are_accepted_for_their_audience() {
        let p = policy();
        let lookup = |n: &str| (n == "service").then_some(&p);
        // uamqp (azure-iot-hub): sr = host, audience https://host.
        let g = verify_token(
            &token("localhost:8443", 2_000),
            "https://localhost:8443",
            lookup,
            1_000,
        )
        .expect("uamqp");
        assert!(g.scope.is_empty());
        // pyamqp: sr = the URL-encoded audience, scheme included.
        let g = verify_token(
            &token("sb://localhost/meridian/consumergroups/$default", 2_000),
            "sb://localhost/meridian/consumergroups/$default",
            lookup,
            1_000,
        )
        .expect("pyamqp");
        assert_eq!(
            g.scope,
            segments(&["meridian", "consumergroups", "$default"])
        );
        let mut grants = Grants::default();
        grants.put(g);
        let p0 = segments(&["meridian", "ConsumerGroups", "$Default", "Partitions", "0"]);
        assert!(grants.check(&p0, Permission::ServiceConnect, 1_500).is_ok());
        let other = segments(&["meridian", "ConsumerGroups", "other", "Partitions", "0"]);
        assert!(
            grants
                .check(&other, Permission::ServiceConnect, 1_500)
                .is_err()
        );
        // Expired at 2_000; a refresh for the same audience replaces it.
        assert_eq!(
            grants
                .check(&p0, Permission::ServiceConnect, 2_000)
                .map_err(|e| e.code),
            Err(ErrorCode::IotHubUnauthorizedAccess)
        );
        let lookup = |n: &str| (n == "service").then_some(&p);
        grants.put(
            verify_token(
                &token("sb://localhost/meridian/consumergroups/$default", 3_000),
                "sb://localhost/meridian/consumergroups/$default",
                lookup,
                1_900,
            )
            .expect("refresh"),
        );
        assert!(grants.check(&p0, Permission::ServiceConnect, 2_500).is_ok());
        assert_eq!(
            grants
                .check(&p0, Permission::RegistryWrite, 2_500)
                .map_err(|e| e.code),
            Err(ErrorCode::Unauthorized)
        );
    }

    #[test]
    fn event_hubs_sdk_tokens_keyed_with_the_key_text_are_accepted() {
        use hmac::{KeyInit, Mac};
        let p = policy();
        let lookup = |n: &str| (n == "service").then_some(&p);
        // azure-eventhub: sr = quote_plus(audience), HMAC keyed with key.encode("utf-8").
        let sr = "sb%3A%2F%2Flocalhost%2Fmeridian";
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(p.primary_key.as_bytes()).expect("key");
        mac.update(format!("{sr}\n2000").as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let sig = percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC);
        let token = format!("SharedAccessSignature sr={sr}&sig={sig}&se=2000&skn=service");
        let g = verify_token(&token, "sb://localhost/meridian", lookup, 1_000).expect("accepted");
        assert_eq!(g.scope, segments(&["meridian"]));
        let forged = token.replace("se=2000", "se=2001");
        assert!(verify_token(&forged, "sb://localhost/meridian", lookup, 1_000).is_err());
    }

    #[test]
    fn bad_tokens_are_refused() {
        let p = policy();
        let lookup = |n: &str| (n == "service").then_some(&p);
        // Expired.
        assert!(verify_token(&token("localhost", 10), "localhost", lookup, 20).is_err());
        // Wrong key.
        let forged = crate::auth::sign(
            "localhost",
            &p.secondary_key.replace('B', "C"),
            50,
            Some("service"),
        )
        .expect("sign");
        assert!(verify_token(&forged, "localhost", lookup, 20).is_err());
        // Unknown policy, no policy.
        let unknown = crate::auth::sign("localhost", &p.primary_key, 50, Some("x")).expect("sign");
        assert!(verify_token(&unknown, "localhost", lookup, 20).is_err());
        let device = crate::auth::sign("localhost", &p.primary_key, 50, None).expect("sign");
        assert!(verify_token(&device, "localhost", lookup, 20).is_err());
        // Scoped to one consumer group, put for the whole hub.
        assert!(
            verify_token(
                &token("sb://localhost/meridian/consumergroups/a", 50),
                "sb://localhost/meridian",
                lookup,
                20
            )
            .is_err()
        );
        assert!(verify_token("garbage", "localhost", lookup, 20).is_err());
    }
}
