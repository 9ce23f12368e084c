//! The cluster's certificates and keys, made fresh for every cluster: one CA,
//! the API server's serving certificate, a client certificate per component,
//! the kubelet's serving certificate and the service-account signing key.
//! ECDSA P-256 throughout (rcgen's default), PEM on disk.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8).
    pub key: PathBuf,
}

/// Every credential a one-node cluster needs.
#[derive(Debug, Clone)]
pub struct ClusterPki {
    /// The cluster CA (signs everything else, and is every trust anchor).
    pub ca: CertFiles,
    /// kube-apiserver's serving certificate.
    pub apiserver: CertFiles,
    /// kube-apiserver's client certificate towards kubelets.
    pub apiserver_kubelet_client: CertFiles,
    /// `kubernetes-admin` in `system:masters`: kubectl, helm and tests.
    pub admin: CertFiles,
    /// `system:kube-controller-manager`.
    pub controller_manager: CertFiles,
    /// `system:kube-scheduler`.
    pub scheduler: CertFiles,
    /// `system:kube-proxy` (bound to `system:node-proxier` by default RBAC).
    pub kube_proxy: CertFiles,
    /// `system:node:<node>` in `system:nodes`: the kubelet's own identity.
    pub kubelet_client: CertFiles,
    /// The kubelet's serving certificate (its node IP and name).
    pub kubelet_serving: CertFiles,
    /// Service-account token signing key (private, PKCS#8).
    pub service_account_key: PathBuf,
    /// Its public half.
    pub service_account_pub: PathBuf,
}

/// Names and addresses the certificates are made for.
#[derive(Debug, Clone)]
pub struct PkiNames<'a> {
    /// The node's name (kubelet identity and serving certificate).
    pub node_name: &'a str,
    /// The node's IP (kubelet serving certificate).
    pub node_ip: IpAddr,
    /// Addresses the API server is reached on (loopback, the node-facing
    /// address, the `kubernetes` Service's ClusterIP).
    pub apiserver_ips: &'a [IpAddr],
}

impl ClusterPki {
    /// Generates every credential into `dir`.
    ///
    /// # Errors
    /// When a key cannot be generated or a file cannot be written.
    pub fn generate(dir: &Path, names: &PkiNames<'_>) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let ca_params = ca_params()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = write_pair(dir, "ca", &ca_cert.pem(), &ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut apiserver_sans: Vec<String> = [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "localhost",
        ]
        .map(str::to_owned)
        .to_vec();
        apiserver_sans.extend(names.apiserver_ips.iter().map(IpAddr::to_string));
        let leaf = |file: &str, cn: &str, org: Option<&str>, sans: Vec<String>, usage| -> Result<CertFiles> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name = name(cn, org);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer)?;
            write_pair(dir, file, &cert.pem(), &key)
        };
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        let node_user = format!("system:node:{}", names.node_name);
        let sa_key = KeyPair::generate()?;
        let service_account_key = dir.join("sa.key");
        let service_account_pub = dir.join("sa.pub");
        fs::write(&service_account_key, sa_key.serialize_pem())?;
        fs::write(&service_account_pub, sa_key.public_key_pem())?;
        Ok(Self {
            apiserver: leaf(
                "apiserver",
                "kube-apiserver",
                None,
                apiserver_sans,
                server.clone(),
            )?,
            apiserver_kubelet_client: leaf(
                "apiserver-kubelet-client",
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
                Vec::new(),
                client.clone(),
            )?,
            admin: leaf(
                "admin",
                "kubernetes-admin",
                Some("system:masters"),
                Vec::new(),
                client.clone(),
            )?,
            controller_manager: leaf(
                "controller-manager",
                "system:kube-controller-manager",
                None,
                Vec::new(),
                client.clone(),
            )?,
            scheduler: leaf(
                "scheduler",
                "system:kube-scheduler",
                None,
                Vec::new(),
                client.clone(),
            )?,
            kube_proxy: leaf(
                "kube-proxy",
                "system:kube-proxy",
                None,
                Vec::new(),
                client.clone(),
            )?,
            kubelet_client: leaf(
                "kubelet-client",
                &node_user,
                Some("system:nodes"),
                Vec::new(),
                client,
            )?,
            kubelet_serving: leaf(
                "kubelet-serving",
                &node_user,
                Some("system:nodes"),
                vec![names.node_name.to_owned(), names.node_ip.to_string()],
                server,
            )?,
            ca,
            service_account_key,
            service_account_pub,
        })
    }
}

impl ClusterPki {
    /// One more certificate signed by the cluster CA, into the CA's
    /// directory as `<file>.crt` and `<file>.key`: for `cn` (in group
    /// `org`), a client certificate, or a serving one for `sans` when
    /// `server`.
    ///
    /// # Errors
    /// When the CA key cannot be read or a file cannot be written.
    pub fn issue(
        &self,
        file: &str,
        cn: &str,
        org: Option<&str>,
        sans: &[&str],
        server: bool,
    ) -> Result<CertFiles> {
        let ca_key = KeyPair::from_pem(&fs::read_to_string(&self.ca.key)?)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name = name(cn, org);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &issuer)?;
        let dir = self.ca.cert.parent().unwrap_or(Path::new("."));
        write_pair(dir, file, &cert.pem(), &key)
    }
}

/// The cluster CA's parameters: the same every time, so that
/// [`ClusterPki::issue`] signs as the CA that [`ClusterPki::generate`] made.
fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name("vfplane-cluster-ca", None);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

fn write_pair(dir: &Path, stem: &str, cert_pem: &str, key: &KeyPair) -> Result<CertFiles> {
    let cert = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    fs::write(&cert, cert_pem).with_context(|| format!("writing {}", cert.display()))?;
    fs::write(&key_path, key.serialize_pem()).with_context(|| format!("writing {}", key_path.display()))?;
    Ok(CertFiles { cert, key: key_path })
}

/// A kubeconfig for `user` with a client certificate, against `server`.
pub fn kubeconfig(server: &str, ca: &Path, user: &str, client: &CertFiles) -> Result<String> {
    let read = |p: &Path| fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "vfplane", "cluster": {
            "server": server,
            "certificate-authority-data": b64(read(ca)?),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(read(&client.cert)?),
            "client-key-data": b64(read(&client.key)?),
        }}],
        "contexts": [{"name": "vfplane", "context": {"cluster": "vfplane", "user": user}}],
        "current-context": "vfplane",
    });
    Ok(serde_json::to_string_pretty(&config)?)
}
