//! `caroni tls-cert` and `caroni mesh-key`: the files the trust options
//! of `caroni-node` take.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};

/// Arguments of `caroni tls-cert`.
#[derive(Debug, clap::Args)]
pub struct TlsCertArgs {
    /// Directory of the CA (`ca.pem`, `ca.key`, made on first use) and of
    /// the new certificate (`HOST.pem`, `HOST.key`).
    #[arg(long, default_value = "caroni-tls")]
    pub dir: PathBuf,
    /// Host name or IP address the node's client API is reached at;
    /// repeat for several (the first names the files).
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,
}

/// Writes `path` readable by its owner only, refusing to overwrite.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The CA's parameters: the same every time, so that a CA made earlier
/// (its key in `ca.key`) signs new certificates that `ca.pem` verifies.
fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Caroni client API CA");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// `caroni tls-cert`: a CA (made once per directory) and a certificate
/// signed by it for the given hosts.
pub fn tls_cert(args: TlsCertArgs) -> anyhow::Result<ExitCode> {
    let hosts: Vec<String> = args
        .hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    let Some(first) = hosts.first().cloned() else {
        bail!("give at least one --host (a name or an IP address clients use)");
    };
    if first.contains('/') || first.starts_with('.') {
        bail!("--host {first} cannot name a file; give a host name or an IP address");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let ca_pem = args.dir.join("ca.pem");
    let ca_key_path = args.dir.join("ca.key");
    let ca_key = if ca_key_path.exists() {
        let text = std::fs::read_to_string(&ca_key_path)
            .with_context(|| format!("cannot read {}", ca_key_path.display()))?;
        rcgen::KeyPair::from_pem(&text).with_context(|| {
            format!(
                "{} is not a PEM private key made by `caroni tls-cert`",
                ca_key_path.display()
            )
        })?
    } else {
        let key = rcgen::KeyPair::generate().context("cannot make the CA key")?;
        let ca = ca_params()
            .self_signed(&key)
            .context("cannot make the CA")?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        write_public(&ca_pem, &ca.pem())?;
        eprintln!(
            "made a CA: {} (its key: {})",
            ca_pem.display(),
            ca_key_path.display()
        );
        key
    };
    let ca = ca_params()
        .self_signed(&ca_key)
        .context("cannot use the CA key")?;

    let mut leaf = rcgen::CertificateParams::new(hosts.clone())
        .with_context(|| format!("not host names or IP addresses: {}", hosts.join(", ")))?;
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, first.clone());
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let year = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 31_556_952)
            .unwrap_or(56) as i32;
    leaf.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(year + 3, 1, 1);
    let key = rcgen::KeyPair::generate().context("cannot make the certificate's key")?;
    let cert = leaf
        .signed_by(&key, &ca, &ca_key)
        .context("cannot sign the certificate")?;
    let cert_path = args.dir.join(format!("{first}.pem"));
    let key_path = args.dir.join(format!("{first}.key"));
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    println!(
        "certificate for {}: {} (key {}), signed by {}\n\nnode:    caroni-node --api-tls-cert {} --api-tls-key {} …\nclient:  caroni --node https://{first}:7070 --tls-ca {} …\ngrpcurl: grpcurl -cacert {} {first}:7070 list",
        hosts.join(", "),
        cert_path.display(),
        key_path.display(),
        ca_pem.display(),
        cert_path.display(),
        key_path.display(),
        ca_pem.display(),
        ca_pem.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// `caroni mesh-key`: a new pre-shared key for a private mesh, written to
/// `file` (never overwritten) or printed.
pub fn mesh_key(file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let key = caroni_peer::MeshKey::generate()?;
    match file {
        Some(path) => {
            write_private(&path, &key.file_text())?;
            eprintln!(
                "wrote a mesh key to {} (fingerprint {}); give it to every node of the mesh with --mesh-key {}",
                path.display(),
                key.fingerprint(),
                path.display()
            );
        }
        None => print!("{}", key.file_text()),
    }
    Ok(ExitCode::SUCCESS)
}
