//! `meridian-control-plane bootstrap`: a new mesh CA and admin credential on disk, keys private,
//! nothing overwritten, and no key material in what it prints.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use meridian_identity::cert::{chain_der, leaf_info};
use meridian_identity::{Credential, LiveCredential, Role, SecretPem, TrustBundle};
use meridian_tests::bin;

fn bootstrap(args: &[&str]) -> Result<std::process::Output> {
    Command::new(bin("meridian-control-plane")?)
        .arg("bootstrap")
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .context("running meridian-control-plane bootstrap")
}

#[test]
fn bootstrap_writes_a_ca_and_an_admin_credential_and_never_overwrites() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    let ca_arg = ca.to_str().context("temp path is not UTF-8")?;
    let first = bootstrap(&["--dir", ca_arg, "--trust-domain", "meridian.test"])?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    ensure!(first.status.success(), "bootstrap failed: {printed}");
    ensure!(
        !printed.contains("PRIVATE KEY"),
        "key material printed: {printed}"
    );

    let mode = |name: &str| -> Result<u32> {
        Ok(std::fs::metadata(ca.join(name))?.permissions().mode() & 0o777)
    };
    for (name, want) in [
        ("ca.pem", 0o644),
        ("issuer.pem", 0o644),
        ("issuer-key.pem", 0o600),
        ("admin.pem", 0o644),
        ("admin-key.pem", 0o600),
    ] {
        ensure!(mode(name)? == want, "{name} has mode {:o}", mode(name)?);
    }

    // The admin credential chains to the bundle and names the admin user of the domain.
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(ca.join("ca.pem"))?)?;
    ensure!(bundle.trust_domain().as_str() == "meridian.test");
    let chain_pem = std::fs::read_to_string(ca.join("admin.pem"))?;
    let leaf = leaf_info(chain_der(&chain_pem)?.first().context("empty chain")?)?;
    ensure!(
        leaf.identity.role
            == Role::User {
                name: "admin".into()
            },
        "{}",
        leaf.identity
    );
    let credential = Credential {
        chain_pem,
        key_pem: SecretPem::new(std::fs::read_to_string(ca.join("admin-key.pem"))?),
        not_after: leaf.not_after,
    };
    LiveCredential::new(&bundle, &credential)
        .context("the admin key does not fit its certificate")?;

    // A second bootstrap into the same directory refuses, naming the file, and changes nothing.
    let key_before = std::fs::read(ca.join("issuer-key.pem"))?;
    let second = bootstrap(&["--dir", ca_arg])?;
    let stderr = String::from_utf8_lossy(&second.stderr);
    ensure!(
        !second.status.success(),
        "a second bootstrap overwrote the CA"
    );
    ensure!(stderr.contains("ca.pem already exists"), "{stderr}");
    ensure!(std::fs::read(ca.join("issuer-key.pem"))? == key_before);

    // Bad input names the flag.
    let bad = bootstrap(&["--dir", ca_arg, "--trust-domain", "Not_A_Domain"])?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        !bad.status.success() && stderr.contains("--trust-domain"),
        "{stderr}"
    );
    Ok(())
}
