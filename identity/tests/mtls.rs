//! Real TLS 1.3 handshakes between mesh configurations: who gets in, who is refused and why.
// Helpers of a test may unwrap too: a panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meridian_identity::tls::{peer_identity, PeerPolicy};
use meridian_identity::{
    bootstrap, cert::LeafInfo, client_config, new_key_and_csr, server_config, AnyInDomain,
    Bootstrap, Credential, Identity, Issuer, LiveCredential, Role, TrustBundle, TrustDomain,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(24 * 3600);

struct Mesh {
    set: Bootstrap,
    issuer: Issuer,
    bundle: TrustBundle,
}

fn mesh(domain: &str) -> Mesh {
    let domain = TrustDomain::new(domain).unwrap();
    let set = bootstrap(&domain, DAY, SystemTime::now()).unwrap();
    let issuer = Issuer::from_pem(&set.issuer_pem, set.issuer_key_pem.expose()).unwrap();
    let bundle = TrustBundle::from_pem(&set.anchor_pem).unwrap();
    Mesh {
        set,
        issuer,
        bundle,
    }
}

impl Mesh {
    fn domain(&self) -> &TrustDomain {
        &self.set.trust_domain
    }

    /// A sidecar of `region` whose key and CSR are its own, as a joining component makes them.
    fn sidecar(&self, region: &str, ttl: Duration, now: SystemTime) -> Credential {
        let request = new_key_and_csr().unwrap();
        let identity = Identity::sidecar(self.domain(), region, "sc-1").unwrap();
        let issued = self
            .issuer
            .issue(&request.csr_pem, &identity, ttl, now)
            .unwrap();
        Credential {
            chain_pem: issued.chain_pem,
            key_pem: request.key_pem,
            not_after: issued.not_after,
        }
    }

    fn live(&self, credential: &Credential) -> Arc<LiveCredential> {
        LiveCredential::new(&self.bundle, credential).unwrap()
    }
}

/// Admits sidecars only (what a gateway asks of its callers).
#[derive(Debug)]
struct SidecarsOnly;

impl PeerPolicy for SidecarsOnly {
    fn admit(&self, peer: &LeafInfo) -> Result<(), String> {
        match peer.identity.role {
            Role::Sidecar { .. } => Ok(()),
            _ => Err(format!("{} is not a sidecar", peer.identity)),
        }
    }
}

/// One handshake and one echoed message; the server's view of the client, or both sides'
/// errors.
async fn call(
    server: tokio_rustls::rustls::ServerConfig,
    client: tokio_rustls::rustls::ClientConfig,
) -> Result<Option<LeafInfo>, (String, String)> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(client));
    let serve = tokio::spawn(async move {
        let mut stream = acceptor
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_identity(stream.get_ref().1.peer_certificates());
        let mut buf = [0u8; 5];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(&buf).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let name = ServerName::try_from("127.0.2.1").unwrap();
    let client_side = async {
        let mut stream = connector
            .connect(name, client_io)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"hello")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"hello");
        Ok::<_, String>(())
    }
    .await;
    let server_side = serve.await.unwrap();
    match (client_side, server_side) {
        (Ok(()), Ok(peer)) => Ok(peer),
        (client, server) => Err((
            client.err().unwrap_or_default(),
            server.err().unwrap_or_default(),
        )),
    }
}

fn gateway(mesh: &Mesh) -> tokio_rustls::rustls::ServerConfig {
    let credential = mesh.sidecar("eu-west", DAY, SystemTime::now());
    server_config(
        &mesh.bundle,
        mesh.live(&credential),
        Arc::new(SidecarsOnly),
        &[b"h2"],
    )
    .unwrap()
}

fn caller(mesh: &Mesh, credential: Option<&Credential>) -> tokio_rustls::rustls::ClientConfig {
    client_config(
        &mesh.bundle,
        credential.map(|c| mesh.live(c)),
        Arc::new(AnyInDomain(mesh.domain().clone())),
        &[b"h2"],
    )
    .unwrap()
}

#[tokio::test]
async fn a_mesh_sidecar_gets_in_and_is_known_by_its_identity() {
    let mesh = mesh("meridian.test");
    let credential = mesh.sidecar("us-east", DAY, SystemTime::now());
    let peer = call(gateway(&mesh), caller(&mesh, Some(&credential)))
        .await
        .unwrap()
        .expect("the server sees the client's certificate");
    assert_eq!(
        peer.identity.uri(),
        "spiffe://meridian.test/region/us-east/sidecar/sc-1"
    );
    let lifetime = peer.not_after.duration_since(peer.not_before).unwrap();
    // A day, plus the five minutes the start is backdated for slow clocks.
    assert_eq!(lifetime, DAY + Duration::from_secs(300));
    assert!(peer.renew_at() < peer.not_after && peer.renew_at() > peer.not_before);
}

#[tokio::test]
async fn every_other_caller_is_refused_during_the_handshake() {
    let mesh = mesh("meridian.test");
    let stranger = self::mesh("meridian.test");
    let now = SystemTime::now();
    let from_other_ca = stranger.sidecar("us-east", DAY, now);
    let expired = mesh.sidecar("us-east", DAY, now - 3 * DAY);
    let admin = mesh.set.admin.clone();

    // No certificate at all.
    let (_, server) = call(gateway(&mesh), caller(&mesh, None)).await.unwrap_err();
    assert!(server.contains("peer sent no certificates"), "{server}");

    // A certificate from another CA of the same name: the chain does not verify. The client
    // config must carry it without its own bundle check, so build it from the stranger's.
    let client = client_config(
        &mesh.bundle,
        Some(stranger.live(&from_other_ca)),
        Arc::new(AnyInDomain(mesh.domain().clone())),
        &[b"h2"],
    );
    // LiveCredential refuses only another trust domain; the same name still gets built.
    // Its issuer has the same name as ours, so the chain is found and its signature fails.
    let (_, server) = call(gateway(&mesh), client.unwrap()).await.unwrap_err();
    assert!(
        server.contains("invalid peer certificate: BadSignature")
            || server.contains("invalid peer certificate: UnknownIssuer"),
        "{server}"
    );

    let (_, server) = call(gateway(&mesh), caller(&mesh, Some(&expired)))
        .await
        .unwrap_err();
    assert!(server.contains("certificate expired"), "{server}");

    // A valid mesh certificate of the wrong role: the policy's reason reaches the server.
    let (_, server) = call(gateway(&mesh), caller(&mesh, Some(&admin)))
        .await
        .unwrap_err();
    assert!(
        server.contains("spiffe://meridian.test/user/admin is not a sidecar"),
        "{server}"
    );
}

#[tokio::test]
async fn a_client_refuses_a_server_from_another_mesh() {
    let mesh = mesh("meridian.test");
    let other = self::mesh("other.test");
    let credential = mesh.sidecar("us-east", DAY, SystemTime::now());
    let (client, _) = call(gateway(&other), caller(&mesh, Some(&credential)))
        .await
        .unwrap_err();
    assert!(client.contains("UnknownIssuer"), "{client}");
}

#[tokio::test]
async fn a_renewed_certificate_is_used_by_the_next_handshake() {
    let mesh = mesh("meridian.test");
    let first = mesh.sidecar("us-east", Duration::from_secs(60), SystemTime::now());
    let live = mesh.live(&first);
    let client = |live: &Arc<LiveCredential>| {
        client_config(
            &mesh.bundle,
            Some(Arc::clone(live)),
            Arc::new(AnyInDomain(mesh.domain().clone())),
            &[],
        )
        .unwrap()
    };
    let before = call(gateway(&mesh), client(&live)).await.unwrap().unwrap();
    let renewed = mesh.sidecar("us-east", DAY, SystemTime::now());
    live.replace(&renewed).unwrap();
    let after = call(gateway(&mesh), client(&live)).await.unwrap().unwrap();
    assert_ne!(before.serial, after.serial);
    assert!(after.not_after > before.not_after);
}

#[test]
fn the_issuer_decides_the_identity_and_refuses_other_domains() {
    let mesh = mesh("meridian.test");
    let other = TrustDomain::new("other.test").unwrap();
    let request = new_key_and_csr().unwrap();
    let foreign = Identity::agent(&other, "us-east", "a1").unwrap();
    let error = mesh
        .issuer
        .issue(&request.csr_pem, &foreign, DAY, SystemTime::now())
        .unwrap_err();
    assert!(
        error.to_string().contains("not in this CA's trust domain"),
        "{error}"
    );
    // A tampered CSR (its signature no longer matches) is refused.
    let mut tampered = request.csr_pem.clone();
    let middle = tampered.len() / 2;
    let replacement = if &tampered[middle..=middle] == "A" {
        "B"
    } else {
        "A"
    };
    tampered.replace_range(middle..=middle, replacement);
    let identity = Identity::agent(mesh.domain(), "us-east", "a1").unwrap();
    assert!(mesh
        .issuer
        .issue(&tampered, &identity, DAY, SystemTime::now())
        .is_err());
    // Nothing outlives the issuer.
    let issued = mesh
        .issuer
        .issue(
            &request.csr_pem,
            &identity,
            Duration::from_secs(9 * 365 * 24 * 3600),
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(issued.not_after, mesh.issuer.not_after());
}

#[test]
fn keys_never_show_in_debug_output() {
    let mesh = mesh("meridian.test");
    let printed = format!("{:?} {:?}", mesh.set, mesh.issuer);
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
    assert!(printed.contains("<redacted>"));
}
