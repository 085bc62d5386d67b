//! X.509 CA authentication: a device with `certificateAuthority` authentication connects with a
//! client certificate chained to a registered, verified CA whose subject CN is the device id.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::start_dev;
use meridian::client::device::{ConnAckCode, RawMqtt, tls_config_with_certificate};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Result<Ca> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    })
}

/// A client certificate for `cn` signed by `ca`: (chain PEM, key PEM).
fn leaf(ca: &Ca, cn: &str) -> Result<(String, String)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok((format!("{}{}", cert.pem(), ca.pem), key.serialize_pem()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_signed_device_connects_only_with_a_verified_ca_and_matching_cn() -> Result<()> {
    let mut cluster = start_dev()?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let (mqtt, server_ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    let r = svc
        .json(
            "PUT",
            "/devices/ca-dev",
            Some(
                &json!({"deviceId": "ca-dev", "authentication": {"type": "certificateAuthority"}}),
            ),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        r.json()["authentication"]["type"],
        json!("certificateAuthority")
    );

    let fleet = ca("fleet CA")?;
    let rogue = ca("rogue CA")?;
    let (good_chain, good_key) = leaf(&fleet, "ca-dev")?;
    let (wrong_cn_chain, wrong_cn_key) = leaf(&fleet, "someone-else")?;
    let (rogue_chain, rogue_key) = leaf(&rogue, "ca-dev")?;
    let try_connect = |chain: String, key: String| {
        let server_ca = server_ca.clone();
        async move {
            let tls = tls_config_with_certificate(&server_ca, &chain, &key)?;
            let (client, code, _) =
                RawMqtt::connect_with(mqtt, None, tls, "ca-dev", "", true, 60).await?;
            Ok::<_, anyhow::Error>((client, code))
        }
    };

    // registered but not verified: refused
    let r = svc
        .json(
            "PUT",
            "/meridian/certificates/fleet",
            Some(&json!({"certificate": fleet.pem, "isVerified": false})),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let (_, code) = try_connect(good_chain.clone(), good_key.clone()).await?;
    assert_eq!(code, ConnAckCode::NotAuthorized, "unverified CA");

    // verified: the device connects and its telemetry is acknowledged
    let r = svc
        .json(
            "PUT",
            "/meridian/certificates/fleet",
            Some(&json!({"certificate": fleet.pem, "isVerified": true})),
        )
        .await?;
    assert_eq!(r.status, 200);
    let (mut device, code) = try_connect(good_chain, good_key).await?;
    assert_eq!(code, ConnAckCode::Success);
    assert!(
        device
            .publish_acked(
                "devices/ca-dev/messages/events/",
                b"hello",
                1,
                Duration::from_secs(10)
            )
            .await?
    );

    // wrong CN, or a CA the hub does not know: refused
    let (_, code) = try_connect(wrong_cn_chain, wrong_cn_key).await?;
    assert_eq!(code, ConnAckCode::NotAuthorized, "CN must be the device id");
    let (_, code) = try_connect(rogue_chain, rogue_key).await?;
    assert_eq!(code, ConnAckCode::NotAuthorized, "unknown CA");

    // a certificate PEM with a private key is refused
    let bad = format!("{}{}", fleet.pem, KeyPair::generate()?.serialize_pem());
    let r = svc
        .json(
            "PUT",
            "/meridian/certificates/bad",
            Some(&json!({"certificate": bad})),
        )
        .await?;
    assert_eq!(r.status, 400);
    Ok(())
}
